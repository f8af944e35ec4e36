"""Stage `tokenizer`: train a byte-level BPE on the corpus (or copy the recipe's) ->
tokenizer/tokenizer.json. With the curate stage in the recipe it reads curate/curated.jsonl."""
from __future__ import annotations

NEEDS: tuple[str, ...] = ()
USES = ("curate",)  # its curated corpus, when the recipe runs the curate stage
SECTIONS = ("data",)


def run(ctx) -> None:
    from lmlab.stages.common import corpus_text_list
    from lmlab.tokenizer import Tokenizer, train_tokenizer

    data, path = ctx.recipe.data, ctx.out / "tokenizer.json"
    tok = Tokenizer.load(data.tokenizer) if data.tokenizer else train_tokenizer(corpus_text_list(ctx), data.vocab_size)
    tok.save(path)
    ctx.echo(f"tokenizer: {tok.vocab_size} tokens -> {path}")
