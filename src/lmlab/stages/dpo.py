"""Stage `dpo`: DPO of the SFT model on the world's preference pairs (preferences_train,
validated on preferences_test_id) -> dpo/ (model/, adapter/ for LoRA/DoRA, metrics.jsonl,
dpo_report.json; sft_first/ with `dpo.sft_first`). Not in the default recipe: add it to
`stages:` after sft."""
from __future__ import annotations

from dataclasses import replace

from lmlab.align.dpo import DPOConfig

NEEDS = ("sft", "world")
SECTIONS = ("dpo",)
CONFIG = ("dpo", DPOConfig)


def cost(recipe) -> float:
    from lmlab.stages.common import FORWARD, PAIR_TOKENS, train_tokens

    d = recipe.dpo
    sft_first = train_tokens(d.sft_train, PAIR_TOKENS // 2) if d.sft_first else 0.0
    return train_tokens(d.train, PAIR_TOKENS) * (1 + FORWARD) + sft_first  # + the reference's log-probs


def run(ctx) -> None:
    from lmlab.align.dpo import train_dpo
    from lmlab.stages.common import policy_dir, require

    cfg = ctx.recipe.dpo
    base = str(policy_dir(ctx, cfg.base))
    data = cfg.data
    if not data.train:
        world = ctx.input("world")
        val = world / "preferences_test_id.jsonl"
        data = replace(data, train=str(require(world / "preferences_train.jsonl", "world")),
                       val=data.val or (str(val) if val.is_file() and not data.val_fraction else None))
    cfg = replace(cfg, base=base, data=data, out=str(ctx.out))
    result = train_dpo(base, ctx.out, cfg, resume="auto" if ctx.resume else False, log=ctx.echo)
    val = result.report["val"]
    ctx.echo(f"dpo ({cfg.method}, {cfg.loss}): {result.train.step} steps, held-out preference accuracy "
             f"{'-' if val is None else format(val['accuracy'], '.3f')}")
