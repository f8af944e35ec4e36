"""Stage `ppo`: PPO with a critic, KL to the reference, GAE and Xu et al.'s best practices,
from the sft stage's model on the world's prompts -> ppo/ (model/, metrics.jsonl,
rl_report.json). The code path is `lmlab.align.online`, shared by ppo, grpo and rloo."""
from __future__ import annotations

from lmlab.align.online import OnlineRLConfig

NEEDS = ("sft", "world")
SECTIONS = ("ppo",)
CONFIG = ("ppo", OnlineRLConfig)


def cost(recipe) -> float:
    from lmlab.align.online import rollout_cost

    return rollout_cost(recipe.ppo)


def run(ctx) -> None:
    from lmlab.align.online import run_stage

    run_stage(ctx, ctx.recipe.ppo)
