"""Stage `grpo`: GRPO (Dr. GRPO / DAPO options) on group rollouts,
from the sft stage's model on the world's prompts -> grpo/ (model/, metrics.jsonl,
rl_report.json). The code path is `lmlab.align.online`, shared by ppo, grpo and rloo."""
from __future__ import annotations

from lmlab.align.online import OnlineRLConfig

NEEDS = ("sft", "world")
SECTIONS = ("grpo",)
CONFIG = ("grpo", OnlineRLConfig)


def cost(recipe) -> float:
    from lmlab.align.online import rollout_cost

    return rollout_cost(recipe.grpo)


def run(ctx) -> None:
    from lmlab.align.online import run_stage

    run_stage(ctx, ctx.recipe.grpo)
