"""Stage `shards`: tokenize and pack the corpus into memory-mapped train/val shards."""
from __future__ import annotations

NEEDS = ("tokenizer",)
SECTIONS = ("data",)


def run(ctx) -> None:
    from lmlab.data.shards import ShardDataset, build_shards
    from lmlab.stages.common import corpus_texts, tokenizer_file
    from lmlab.tokenizer import Tokenizer

    data = ctx.recipe.data
    tok = Tokenizer.load(tokenizer_file(ctx.run_dir))
    build_shards(corpus_texts(data), tok, ctx.out, seq_len=data.seq_len,
                 val_fraction=data.val_fraction, text_field=data.text_field)
    train, val = ShardDataset(ctx.out, split="train"), ShardDataset(ctx.out, split="val")
    ctx.echo(f"shards: {len(train)} train / {len(val)} val sequences of {data.seq_len} tokens -> {ctx.out}")
