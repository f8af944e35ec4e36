"""Stage `sft`: instruction-tune the pretrained model on the world's chat set ->
sft/{model, adapter, checkpoints, metrics.jsonl, finetune_report.json}. `lmlab finetune` is
this stage run alone: both call `lmlab.train.finetune.run_finetune` with one config shape."""
from __future__ import annotations

from dataclasses import replace

from lmlab.train.finetune import FinetuneConfig, default_sft

NEEDS = ("pretrain", "world")
SECTIONS = ("sft",)
CONFIG = ("sft", FinetuneConfig, default_sft)


def cost(recipe) -> float:
    from lmlab.stages.common import train_tokens

    return train_tokens(recipe.sft.train, recipe.sft.data.seq_len or recipe.data.seq_len)


def run(ctx) -> None:
    """The pipeline's sft stage: the recipe's `sft` section, with the pretrained model and
    the world's chat set where it names none."""
    from lmlab.stages.common import model_dir, require
    from lmlab.train.finetune import run_finetune

    cfg = ctx.recipe.sft
    base = cfg.base or str(model_dir(ctx.run_dir, "pretrain"))
    data = cfg.data
    if not data.train:
        data = replace(data, train=str(require(ctx.input("world") / "sft.jsonl", "world")),
                       seq_len=data.seq_len or ctx.recipe.data.seq_len)
    cfg = replace(cfg, base=base, data=data, out=str(ctx.out))
    result = run_finetune(cfg, ctx.out, resume="auto" if ctx.resume else False, log=ctx.echo)
    ctx.echo(f"sft ({cfg.method}): {result.train.step} steps, val loss "
             f"{'-' if result.val_loss is None else f'{result.val_loss:.3f}'}, teacher-forced exact match "
             f"{'-' if result.exact_match is None else f'{result.exact_match:.3f}'}")
