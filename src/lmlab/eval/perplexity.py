"""Perplexity of a corpus, document by document, in rolling windows at the model's context.

Every document is scored on its own, conditioned on the prefix token (BOS, else EOS), and
every one of its tokens is predicted exactly once (`lmlab.eval.scoring.rolling_windows`).
The figures are lm-eval's for its perplexity tasks (wikitext):
    token_perplexity = exp(NLL / tokens)
    word_perplexity  = exp(NLL / words)     words: whitespace-separated pieces, re.split(r"\\s+")
    byte_perplexity  = exp(NLL / bytes)     UTF-8 bytes
    bits_per_byte    = NLL / bytes / ln 2
with NLL the total negative log-likelihood in nats. Word and byte figures do not depend on
the tokenizer, so they compare models with different vocabularies.
"""
from __future__ import annotations

import math
import re
from typing import Iterable

from torch import nn

from lmlab.errors import LmlabError
from lmlab.eval.scoring import model_context, prefix_token, rolling_windows, score_pairs


def word_count(text: str) -> int:
    return len(re.split(r"\s+", text))


def document_loglikelihoods(model: nn.Module, tokenizer, texts: list[str], *, stride: int | None = None,
                            max_len: int | None = None, batch_size: int = 16,
                            precision=None) -> list[tuple[float, int]]:
    """(sum log p, tokens scored) of each text, every token scored once."""
    max_len = max_len or model_context(model)
    prefix = prefix_token(tokenizer)
    pairs, owner = [], []
    for i, text in enumerate(texts):
        windows = rolling_windows(tokenizer.encode(text), prefix, max_len, stride)
        pairs += windows
        owner += [i] * len(windows)
    scores = score_pairs(model, pairs, batch_size=batch_size, precision=precision, max_len=max_len)
    sums = [0.0] * len(texts)
    counts = [0] * len(texts)
    for i, (pair, (logp, _)) in zip(owner, zip(pairs, scores)):
        sums[i] += logp
        counts[i] += len(pair[1])
    return list(zip(sums, counts))


def perplexity_from_totals(nll: float, tokens: int, words: int, n_bytes: int) -> dict[str, float]:
    return {"nll": nll, "tokens": tokens, "words": words, "bytes": n_bytes,
            "nll_per_token": nll / tokens,
            "token_perplexity": math.exp(nll / tokens),
            "word_perplexity": math.exp(nll / words),
            "byte_perplexity": math.exp(nll / n_bytes),
            "bits_per_byte": nll / n_bytes / math.log(2)}


def perplexity(model: nn.Module, tokenizer, texts: Iterable[str], *, stride: int | None = None,
               max_len: int | None = None, batch_size: int = 16, precision=None) -> dict:
    """Corpus perplexity over `texts` (empty texts are skipped); see the module docstring."""
    texts = [t for t in texts if t]
    if not texts:
        raise LmlabError("the corpus has no non-empty documents to score")
    max_len = max_len or model_context(model)
    if max_len > model_context(model):
        raise LmlabError(f"window length {max_len} exceeds the model's context of {model_context(model)}")
    docs = document_loglikelihoods(model, tokenizer, texts, stride=stride, max_len=max_len,
                                   batch_size=batch_size, precision=precision)
    scored = [(t, lp, n) for t, (lp, n) in zip(texts, docs) if n > 0]
    if not scored:
        raise LmlabError("no document has a token to score (they all encode to nothing)")
    nll = -sum(lp for _, lp, _ in scored)
    result = perplexity_from_totals(nll, sum(n for *_, n in scored), sum(word_count(t) for t, *_ in scored),
                                    sum(len(t.encode("utf-8")) for t, *_ in scored))
    return {"documents": len(scored), "window": max_len, "stride": stride or max_len,
            "precision": precision.name if precision is not None else "float32", **result}
