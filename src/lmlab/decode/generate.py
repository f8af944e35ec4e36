"""Batched autoregressive generation over one preallocated KV cache.

Prompts of different lengths are left-padded: every row writes the same cache slot at each
step, rotary positions are per row (counting real tokens only), and a key-validity mask
hides the padding. Rows that finish keep stepping with a pad token until the whole batch
is done (or is stopped early), so a step never reshapes or copies the cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from lmlab.decode.sampling import apply_repetition_penalty, process_logits, sample
from lmlab.errors import LmlabError


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)  # new tokens only (the EOS included)
    logprobs: list[float] = field(default_factory=list)  # the model's log p(token), temperature 1
    finish_reason: str | None = None  # "eos", "stop" (a stop string) or "length"
    text: str | None = None  # decoded new text, cut before a stop string (needs decode)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen; every field is checked here, so a bad value fails with
    its name and range instead of reaching the sampler."""
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        if not _is_number(self.temperature) or self.temperature < 0:
            raise LmlabError(f"temperature must be a number >= 0 (0 is greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool)
                                       or self.top_k < 1):
            raise LmlabError(f"top_k must be an integer >= 1 (or None for no limit), got {self.top_k!r}")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise LmlabError(f"top_p must be a number in (0, 1] (or None), got {self.top_p!r}")
        if self.min_p is not None and (not _is_number(self.min_p) or not 0 <= self.min_p <= 1):
            raise LmlabError(f"min_p must be a number in [0, 1] (or None), got {self.min_p!r}")
        if self.repetition_penalty is not None and (not _is_number(self.repetition_penalty)
                                                    or self.repetition_penalty <= 0):
            raise LmlabError(f"repetition_penalty must be a number > 0 (1 is none; or None), "
                             f"got {self.repetition_penalty!r}")


def check_max_new_tokens(max_new_tokens) -> int:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise LmlabError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    return max_new_tokens


@dataclass
class Step:
    """One decoding step for the whole batch, as `stream` yields it."""
    index: int
    tokens: list[int | None]  # the new token of each row (None: the row had finished)
    logprobs: list[float | None]
    finished: list[bool]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids and (B, P) validity for prompts right-aligned to the longest one."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LmlabError("every prompt needs at least one token (e.g. encode with add_bos=True)")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        valid[i, width - len(p):] = True
    return ids, valid


def check_token_ids(ids: torch.Tensor, vocab_size: int, what: str = "a prompt") -> None:
    """An id past the embedding would fail deep in the model with an IndexError (or read
    garbage on some devices): say which tokenizer/model pair is wrong instead."""
    if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab_size):
        bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
        raise LmlabError(
            f"{what} holds token id {bad}, outside the model's vocabulary of {vocab_size}; the tokenizer "
            "does not belong to this model: use the tokenizer the model was trained with"
        )


class Decoder:
    """Steps a model over a left-padded batch: `prefill` once, then `step(tokens)`.
    Proxy-tuning and speculative decoding drive several of these in lock-step."""

    def __init__(self, model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int = 0,
                 compile: bool = False) -> None:
        self.model = model
        param = next(model.parameters())
        self.device = param.device
        ids, valid = left_pad(prompts, pad_id)
        check_token_ids(ids[valid], model.config.vocab_size)
        total = ids.shape[1] + max_new_tokens
        limit = model.config.max_seq_len
        if total > limit:
            raise LmlabError(
                f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
                f"model's context of {limit}; shorten the prompt or generate fewer tokens"
            )
        self.compiled = None
        if compile:
            from lmlab.decode.static import SLOT_BUCKET, check_compilable, compiled_step

            check_compilable(model)
            self.compiled = compiled_step()
            total = min(limit, -(-total // SLOT_BUCKET) * SLOT_BUCKET)
        self.cache = model.new_cache(len(prompts), total)
        self.ids = ids.to(self.device)
        # Validity of every cache slot; generated slots are valid as soon as they are written.
        self.valid = torch.ones(len(prompts), total, dtype=torch.bool, device=self.device)
        self.valid[:, : ids.shape[1]] = valid.to(self.device)
        self.padded = not bool(valid.all())
        self.next_pos = valid.sum(1).to(self.device)  # per-row position of the next token

    def _mask(self, t: int) -> torch.Tensor | None:
        if not self.padded:
            return None
        k_len = self.cache.length + t
        window = self.model.config.sliding_window
        if t == 1 and (window is None or k_len <= window):
            # One new token sees every valid slot written so far, its own included: the
            # key-validity row is the whole mask, with no causal mask to build per step.
            return self.valid[:, None, None, :k_len]
        return self.valid[:, :k_len]

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        """Run the prompts; return the (B, V) logits for the first new token."""
        positions = (self.valid[:, : self.ids.shape[1]].long().cumsum(1) - 1).clamp(min=0)
        logits = self.model(self.ids, positions=positions, cache=self.cache, attn_mask=self._mask(self.ids.shape[1]))
        return logits[:, -1].float()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed (B,) tokens; return the (B, V) logits for the next ones."""
        if self.compiled is None:
            return self.extend(tokens[:, None])[:, -1]
        slot = torch.tensor([self.cache.length], device=self.device)
        if self.cache.length >= self.cache.max_len:
            raise LmlabError(f"KV cache is full ({self.cache.max_len} slots); generate fewer tokens")
        logits = self.compiled(self.model, self.cache, tokens[:, None].to(self.device), self.next_pos[:, None],
                               slot, self.valid, self.model.config.sliding_window)
        self.cache.advance(1)
        self.next_pos = self.next_pos + 1
        return logits.float()

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed (B, T) tokens at once (speculative verification); return (B, T, V) logits."""
        t = tokens.shape[1]
        positions = self.next_pos[:, None] + torch.arange(t, device=self.device)
        logits = self.model(tokens.to(self.device), positions=positions, cache=self.cache, attn_mask=self._mask(t))
        self.next_pos = self.next_pos + t
        return logits.float()

    def rollback(self, n: int) -> None:
        """Forget the last `n` fed tokens (rejected speculative tokens)."""
        if n:
            self.cache.truncate(self.cache.length - n)
            self.next_pos = self.next_pos - n


def _stop_hit(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def stream(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
           repetition_penalty: float | None = None, eos_id: int | None = None,
           stop: Sequence[str] | None = None, decode: Callable[[list[int]], str] | None = None,
           seed: int | None = None, pad_id: int = 0, results: list[Generation] | None = None,
           next_logits: Callable | None = None, compile: bool = False) -> Iterator[Step]:
    """Yield one `Step` per generated position until every row has finished.

    `compile=True` runs each decoding step as one static-shape graph under torch.compile
    (`lmlab.decode.static`); the first call per batch size and cache size compiles (slow),
    later ones reuse it. Greedy tokens equal the eager path's.

    `results`, if given, is filled with one `Generation` per prompt as decoding goes.
    `next_logits`, if given, replaces the single-model forward: it receives the tokens just
    sampled (None before the first step) and returns (B, V) scores (used by proxy-tuning)."""
    check_max_new_tokens(max_new_tokens)
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    if stop and decode is None:
        raise LmlabError("stop strings need a decode function (pass decode=tokenizer.decode)")
    if next_logits is None:
        decoder = Decoder(model, prompts, max_new_tokens, pad_id, compile=compile)

        def next_logits(tokens):
            return decoder.prefill() if tokens is None else decoder.step(tokens)

        device = decoder.device
    else:
        device = next(model.parameters()).device if model is not None else torch.device("cpu")
    b = len(prompts)
    gens = results if results is not None else []
    gens[:] = [Generation() for _ in range(b)]
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    seen = None
    logits = next_logits(None)
    if params.repetition_penalty:
        seen = torch.zeros(b, logits.shape[-1], dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen[i, torch.as_tensor(list(p), device=device)] = True
    for index in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        logprobs = logits.log_softmax(-1)
        scores = process_logits(logits, params.temperature, params.top_k, params.top_p, params.min_p)
        tokens = sample(scores, params.temperature, generator)
        tokens = torch.where(finished, torch.full_like(tokens, pad_id), tokens)
        chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
        if seen is not None:
            seen[torch.arange(b, device=device), tokens] = True
        # One host transfer per step: the tokens are needed on the host for stop checks anyway.
        tok_list, lp_list, was_done = tokens.tolist(), chosen.tolist(), finished.tolist()
        step_tokens: list[int | None] = []
        step_lps: list[float | None] = []
        for i in range(b):
            if was_done[i]:
                step_tokens.append(None)
                step_lps.append(None)
                continue
            g = gens[i]
            g.tokens.append(tok_list[i])
            g.logprobs.append(lp_list[i])
            step_tokens.append(tok_list[i])
            step_lps.append(lp_list[i])
            if eos_id is not None and tok_list[i] == eos_id:
                g.finish_reason = "eos"
            elif stop:
                text = decode(g.tokens)
                cut = _stop_hit(text, stop)
                if cut is not None:
                    g.finish_reason, g.text = "stop", text[:cut]
            if g.finish_reason is None and index == max_new_tokens - 1:
                g.finish_reason = "length"
            if g.finish_reason is not None:
                finished[i] = True
        done = finished.tolist()
        yield Step(index, step_tokens, step_lps, done)
        if all(done):
            break
        logits = next_logits(tokens)
    for g in gens:
        if g.finish_reason is None:
            g.finish_reason = "length"
        if decode is not None and g.text is None:
            body = g.tokens[:-1] if g.finish_reason == "eos" else g.tokens
            g.text = decode(body)


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, **kwargs) -> list[Generation]:
    """Generate for every prompt (token-id lists); see `stream` for the options."""
    results: list[Generation] = []
    for _ in stream(model, prompts, max_new_tokens, results=results, **kwargs):
        pass
    return results
