"""Stage `ppo`: PPO with a critic, KL to the reference, GAE and Xu et al.'s best practices,
from the sft stage's model on the world's prompts -> ppo/ (model/, metrics.jsonl,
rl_report.json). The code path is `lmlab.stages.online_rl`, shared by ppo, grpo and rloo."""
from __future__ import annotations

NEEDS = ("sft", "world")
SECTIONS = ("ppo",)


def run(ctx) -> None:
    from lmlab.stages.online_rl import run_stage

    run_stage(ctx, ctx.recipe.ppo)
