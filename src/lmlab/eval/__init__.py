"""Evaluation: `scoring` (the one continuation scorer), `perplexity` (rolling windows),
`multiple_choice` (acc, acc_norm), `gold` (a world's gold reward and exact match),
`win_rate` (two policies judged by a Reward), `answers` (teacher-forced exact match),
`report` (tables, JSON) and `lm_eval_adapter` (lm-eval's "lmlab" model; needs lm-eval)."""
