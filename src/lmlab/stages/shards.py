"""Stage `shards`: tokenize and pack the corpus into memory-mapped train/val shards (the
curate stage's curated.jsonl when the recipe runs that stage)."""
from __future__ import annotations

NEEDS = ("tokenizer",)
USES = ("curate",)
SECTIONS = ("data",)


def run(ctx) -> None:
    from lmlab.data.shards import ShardDataset, build_shards
    from lmlab.stages.common import corpus_source, tokenizer_file
    from lmlab.tokenizer import Tokenizer

    data = ctx.recipe.data
    tok = Tokenizer.load(tokenizer_file(ctx.run_dir))
    source, text_field = corpus_source(ctx)
    build_shards(source, tok, ctx.out, seq_len=data.seq_len, val_fraction=data.val_fraction, text_field=text_field)
    train, val = ShardDataset(ctx.out, split="train"), ShardDataset(ctx.out, split="val")
    ctx.echo(f"shards: {len(train)} train / {len(val)} val sequences of {data.seq_len} tokens -> {ctx.out}")
