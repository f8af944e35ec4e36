"""Log-likelihood of token continuations, batched: the one scorer behind perplexity,
multiple choice and the lm-eval adapter.

A request is a (context ids, continuation ids) pair: the model reads the context and the
continuation but its last token, and log p(continuation | context) is the sum over the
continuation tokens, read by `lmlab.train.logprobs.masked_logprobs` with the context masked
out. Rolling windows (`rolling_windows`) turn a long text into such pairs so that every
token is scored exactly once.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from lmlab.data import IGNORE_INDEX
from lmlab.errors import LmlabError
from lmlab.train.logprobs import masked_logprobs

Pair = tuple[Sequence[int], Sequence[int]]


def model_context(model: nn.Module) -> int:
    return int(model.config.max_seq_len)


def prefix_token(tokenizer) -> int:
    """What a text with no context is conditioned on: BOS, else EOS (lm-eval's rule)."""
    for tid in (getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)):
        if tid is not None:
            return int(tid)
    raise LmlabError("the tokenizer has neither a BOS nor an EOS token, so the first token of a text has "
                     "nothing to be conditioned on; use a tokenizer with one of them")


def encode_pair(tokenizer, context: str, continuation: str, add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-eval splits them: spaces ending the context
    move to the continuation (" Paris" is one token, "Paris" after a space another), the
    whole text is encoded at once and the continuation is what follows the context's ids, so
    the continuation tokens are those the model would see in the joined text. An empty
    context becomes the prefix token (BOS, else EOS)."""
    if not continuation:
        raise LmlabError("a continuation to score must not be empty")
    if not context:
        cont, prefix = tokenizer.encode(continuation), prefix_token(tokenizer)
        # A continuation that starts with the prefix token is its own context (lm-eval's rule).
        return (cont[:1], cont[1:]) if cont and cont[0] == prefix else ([prefix], cont)
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    if not stripped:  # only whitespace: nothing left to condition on but the prefix
        return encode_pair(tokenizer, "", continuation, add_special_tokens)
    whole = encode_text(tokenizer, stripped + continuation, add_special_tokens)
    ctx = encode_text(tokenizer, stripped, add_special_tokens)
    return ctx, whole[len(ctx):]


def encode_text(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Ids of `text`; with `add_special_tokens`, BOS/EOS as the checkpoint's tokenizer adds them."""
    if add_special_tokens:
        try:
            return tokenizer.encode(text, add_special_tokens=True)
        except TypeError:  # a minimal tokenizer: BOS by hand where it has one
            bos = getattr(tokenizer, "bos_id", None)
            return ([bos] if bos is not None else []) + tokenizer.encode(text)
    return tokenizer.encode(text)


def fit_pair(context: Sequence[int], continuation: Sequence[int], max_len: int) -> tuple[list[int], list[int]]:
    """Left-truncate the context so that the model reads at most `max_len` tokens
    (context + continuation minus its last token), as lm-eval does."""
    context, continuation = list(context), list(continuation)
    if not context:
        raise LmlabError("a scored continuation needs at least one context token (a BOS/EOS prefix)")
    if not continuation:
        raise LmlabError("a continuation to score must have at least one token")
    if len(continuation) > max_len:
        raise LmlabError(f"a continuation of {len(continuation)} tokens does not fit the model's context of "
                         f"{max_len}; score long texts with rolling windows (lmlab eval perplexity)")
    keep = max_len + 1 - len(continuation)
    return context[-keep:], continuation


def score_pairs(model: nn.Module, pairs: Sequence[Pair], *, batch_size: int = 16, precision=None,
                max_len: int | None = None) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), whether every continuation token is the argmax)
    for each pair, in input order, under `precision` (a `lmlab.precision.Resolved`).

    Pairs run longest first in right-padded batches: a causal model's outputs at real
    positions never see the padding after them, so no mask is needed."""
    if batch_size <= 0:
        raise LmlabError(f"batch_size must be positive, got {batch_size}")
    max_len = max_len or model_context(model)
    fitted = [fit_pair(c, t, max_len) for c, t in pairs]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[tuple[float, bool] | None] = [None] * len(fitted)
    order = sorted(range(len(fitted)), key=lambda i: -(len(fitted[i][0]) + len(fitted[i][1])))
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    try:
        with torch.no_grad(), autocast:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                ids, targets = _batch([fitted[i] for i in idx])
                lp = masked_logprobs(model, ids.to(device), targets.to(device), accuracy=True)
                greedy = (lp.correct | ~lp.mask).all(-1)
                for row, i in enumerate(idx):
                    out[i] = (float(lp.sums[row]), bool(greedy[row]))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def _batch(pairs: Sequence[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) inputs (context + continuation minus the last token) and targets (the next
    token at continuation positions, IGNORE_INDEX elsewhere), right-padded."""
    width = max(len(c) + len(t) - 1 for c, t in pairs)
    ids = torch.zeros(len(pairs), width, dtype=torch.long)
    targets = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ctx, cont) in enumerate(pairs):
        full = ctx + cont
        n = len(full) - 1
        ids[row, :n] = torch.tensor(full[:-1])
        targets[row, len(ctx) - 1:n] = torch.tensor(cont)
    return ids, targets


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_len: int, stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that score every token of `tokens` exactly once.

    The first window reads from scratch: the prefix token, then up to `max_len` tokens are
    predicted. Each later window predicts the next `stride` tokens (default `max_len`) and
    reads the `max_len` tokens before each of them, so a token predicted late in a window
    sees up to `max_len` tokens of history and one early in it at least `max_len - stride + 1`.
    `stride == max_len` is lm-eval's `loglikelihood_rolling`; a smaller stride gives every
    prediction more context at more forward passes. The last window is full-length too."""
    if max_len < 1:
        raise LmlabError(f"the window length must be at least 1 token, got {max_len}")
    stride = max_len if stride is None else stride
    if not 1 <= stride <= max_len:
        raise LmlabError(f"stride must be in 1..{max_len} (the window length), got {stride}")
    tokens = list(tokens)
    if not tokens:
        return []
    seq = [prefix_id] + tokens  # seq[j + 1] is tokens[j]
    first = min(max_len, len(tokens))
    windows = [([prefix_id], tokens[:first])]
    done = first
    while done < len(tokens):
        end = min(done + stride, len(tokens))  # predict tokens[done:end] = seq[done+1:end+1]
        start = end - max_len  # > 0: done >= first == max_len here
        windows.append((seq[start:done + 1], seq[done + 1:end + 1]))
        done = end
    return windows
