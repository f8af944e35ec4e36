"""Stage `pretrain`: build the recipe's model around the tokenizer's vocabulary and train
it on the shards -> pretrain/{metrics.jsonl, checkpoints/, model/, loss.png}."""
from __future__ import annotations

from typing import Any

from lmlab.errors import LmlabError

NEEDS = ("tokenizer", "shards")
SECTIONS = ("model", "train")


def model_config_for(spec: Any, vocab_size: int, seq_len: int):
    """The recipe's model with the tokenizer's vocabulary (unless the recipe sets a larger one)."""
    from lmlab.config import resolve_model_config

    spec_map = {"preset": spec} if isinstance(spec, str) else dict(spec)
    if "vocab_size" in spec_map and spec_map["vocab_size"] < vocab_size:
        raise LmlabError(f"model.vocab_size={spec_map['vocab_size']} is smaller than the tokenizer's "
                         f"{vocab_size} tokens; drop model.vocab_size to use the tokenizer's")
    spec_map.setdefault("vocab_size", vocab_size)
    cfg = resolve_model_config(spec_map)
    if seq_len > cfg.max_seq_len:
        raise LmlabError(f"data.seq_len={seq_len} is longer than the model's context "
                         f"model.max_seq_len={cfg.max_seq_len}; lower one or raise the other")
    return cfg


def cost(recipe) -> float:
    from lmlab.stages.common import train_tokens

    return train_tokens(recipe.train, recipe.data.seq_len)


def run(ctx) -> None:
    import torch

    from lmlab.checkpoint import save_model
    from lmlab.data.shards import ShardDataset
    from lmlab.model.transformer import build_model, count_parameters
    from lmlab.stages.common import require, tokenizer_file
    from lmlab.tokenizer import Tokenizer
    from lmlab.train.loop import train
    from lmlab.train.objectives.lm import LanguageModeling
    from lmlab.train.plot import plot_losses

    tok = Tokenizer.load(tokenizer_file(ctx.run_dir))
    shards = require(ctx.input("shards"), "shards")
    train_data, val_data = ShardDataset(shards, split="train"), ShardDataset(shards, split="val")
    cfg = model_config_for(ctx.recipe.model, tok.vocab_size, train_data.seq_len)
    tcfg = ctx.recipe.train
    torch.manual_seed(tcfg.seed)
    model = build_model(cfg, device=tcfg.device)
    ctx.echo(f"model: {count_parameters(model):,} parameters ({cfg.n_layers} layers, d={cfg.d_model})")
    result = train(model, LanguageModeling(), train_data, tcfg, ctx.out, val_data=val_data, tokenizer=tok,
                   resume="auto" if ctx.resume else False, log=ctx.echo)
    ctx.echo(f"trained {result.step} steps, {result.tokens:,} tokens at {result.tokens_per_s:,.0f} tokens/s; "
             f"final loss {result.losses[-1] if result.losses else float('nan'):.3f}"
             + (f", val loss {result.val_loss:.3f}" if result.val_loss is not None else ""))
    save_model(model, ctx.out / "model", tokenizer=tok,
               extra={"train": {"step": result.step, "val_loss": result.val_loss,
                                "precision": result.precision.name}})
    png = plot_losses({ctx.recipe.name: ctx.out}, ctx.out / "loss.png",
                      title=f"{ctx.recipe.name}: {cfg.n_layers} layers, d={cfg.d_model}")
    ctx.echo(f"model -> {ctx.out / 'model'}; loss plot -> {png}")
