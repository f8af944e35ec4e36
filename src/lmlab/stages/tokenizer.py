"""Stage `tokenizer`: train a byte-level BPE on the corpus (or copy the recipe's) ->
tokenizer/tokenizer.json."""
from __future__ import annotations

NEEDS: tuple[str, ...] = ()
SECTIONS = ("data",)


def run(ctx) -> None:
    from lmlab.stages.common import texts
    from lmlab.tokenizer import Tokenizer, train_tokenizer

    data, path = ctx.recipe.data, ctx.out / "tokenizer.json"
    tok = Tokenizer.load(data.tokenizer) if data.tokenizer else train_tokenizer(texts(data), data.vocab_size)
    tok.save(path)
    ctx.echo(f"tokenizer: {tok.vocab_size} tokens -> {path}")
