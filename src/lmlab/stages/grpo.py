"""Stage `grpo`: GRPO (Dr. GRPO / DAPO options) on group rollouts,
from the sft stage's model on the world's prompts -> grpo/ (model/, metrics.jsonl,
rl_report.json). The code path is `lmlab.stages.online_rl`, shared by ppo, grpo and rloo."""
from __future__ import annotations

NEEDS = ("sft", "world")
SECTIONS = ("grpo",)


def run(ctx) -> None:
    from lmlab.stages.online_rl import run_stage

    run_stage(ctx, ctx.recipe.grpo)
