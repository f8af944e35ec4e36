"""Continuous batching: one background thread steps ONE running batch of sequences; new
requests join it at the next step and finished (or abandoned) ones leave it at once.

Each running sequence owns a row of a `SlotCache` (its keys/values from slot 0, so slot ==
rotary position). A step is: drop cancelled rows, admit queued requests into free rows and
prefill them together (right-padded, one forward), sample one token for every row with its
own parameters and generator, emit, free finished rows, then one decode forward over all
rows at their own positions behind a per-row key-validity mask.

Rows are kept dense, [0, active): a finished row is refilled by moving the last row into
it, so a forward reads plain views of the cache and never gathers.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from lmlab.decode.generate import SamplingParams, check_max_new_tokens
from lmlab.decode.proxy import proxy_scores, shared_vocab_size
from lmlab.decode.sampling import apply_repetition_penalty, process_logits, sample
from lmlab.errors import LmlabError
from lmlab.serve.slots import SlotCache, decode_mask, prefill_mask
from lmlab.serve.text import TextStream

log = logging.getLogger("lmlab.serve")


class QueueFull(LmlabError):
    """The waiting queue is at its bound; the client should retry later (HTTP 429)."""


@dataclass(frozen=True)
class GenParams:
    """What one request asks for; `n` sequences share its prompt."""
    max_tokens: int = 16
    sampling: SamplingParams = SamplingParams()
    seed: int | None = None  # choice j draws from a generator seeded with seed + j
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()  # tokens that end a sequence (EOS, a template's end token)
    logprobs: int | None = None  # None: no log-probs; k >= 0: the chosen token's and the top k
    prompt_logprobs: int | None = None  # the same for every prompt token (echo)
    n: int = 1

    def __post_init__(self) -> None:
        if self.max_tokens != 0:  # 0 is allowed: score the prompt only
            check_max_new_tokens(self.max_tokens)
        if not isinstance(self.n, int) or self.n < 1:
            raise LmlabError(f"n must be an integer >= 1, got {self.n!r}")


# ---- events a request's sink receives, in order -----------------------------------------

@dataclass
class PromptLogprobs:
    logprobs: list[float | None]  # per prompt token; the first has no prefix, so None
    top: list[list[tuple[int, float]] | None] | None


@dataclass
class Token:
    choice: int
    token: int
    logprob: float  # log p(token) under the model (after any repetition penalty), temperature 1
    top: list[tuple[int, float]] | None
    text: str  # new text this token makes final (may be empty)
    is_stop: bool  # a stop token (EOS / end of turn): ends the sequence, adds no text


@dataclass
class Finished:
    choice: int
    reason: str  # "eos", "stop" (stop string), "length" or "cancelled"
    text: str  # held-back text released at the end
    tokens: int  # generated tokens, stop token included


@dataclass
class Failed:
    message: str


class Request:
    _ids = itertools.count()

    def __init__(self, prompt: Sequence[int], params: GenParams, sink: Callable[[object], None]) -> None:
        self.id = next(Request._ids)
        self.prompt = list(prompt)
        self.params = params
        self.sink = sink
        self.cancelled = False
        self.open_choices = params.n if params.max_tokens else 1
        self.submitted = time.monotonic()

    def cancel(self) -> None:
        """Safe from any thread: the engine frees the request's rows at its next step."""
        self.cancelled = True

    def emit(self, event: object) -> None:
        try:
            self.sink(event)
        except Exception:  # a sink whose client is gone (closed event loop): stop generating
            self.cancelled = True


@dataclass
class _Seq:
    req: Request
    choice: int
    pos: int  # slots filled in this sequence's row
    text: TextStream
    generator: torch.Generator | None
    seen: torch.Tensor | None  # (V,) bool of tokens seen, for the repetition penalty
    last: int = -1
    generated: int = 0


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    requests_finished: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    peak_active: int = 0  # the most sequences ever decoded in one step
    recent: deque = field(default_factory=lambda: deque(maxlen=4096))  # (time, tokens) per step

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self.recent) if now - t <= window]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span


class Batcher:
    """`submit` from any thread; the engine thread calls each request's sink with events.

    max_batch: rows (concurrent sequences); 1 serves requests strictly one at a time.
    max_queue: requests waiting for a row before `submit` raises QueueFull.
    max_prefill_tokens: padded prompt tokens prefilled together in one step (the first
        admitted request always goes, however long).
    """

    def __init__(self, model, decode: Callable[[list[int]], str], *, max_batch: int = 32,
                 max_queue: int = 256, max_len: int | None = None, max_prefill_tokens: int = 4096,
                 proxy: tuple | None = None) -> None:
        """`proxy`: (expert, anti_expert, alpha) to serve the proxy-tuned distribution
        log p_base + alpha (log p_expert - log p_anti) of `model` as the base (Liu et al., 2024);
        the three step in lock-step, each over its own cache."""
        if max_batch < 1:
            raise LmlabError(f"max_batch must be at least 1, got {max_batch}")
        if max_queue < 0:
            raise LmlabError(f"max_queue must be >= 0, got {max_queue}")
        self.model = model.eval()
        self.members = [self.model]
        self.alpha = 1.0
        if proxy is not None:
            expert, anti, self.alpha = proxy
            self.members += [expert.eval(), anti.eval()]
        self.decode = decode
        self.max_batch, self.max_queue = max_batch, max_queue
        context = min(m.config.max_seq_len for m in self.members)
        self.max_len = min(max_len or context, context)
        self.max_prefill_tokens = max_prefill_tokens
        self.vocab = shared_vocab_size({f"member {i}": m.config.vocab_size for i, m in enumerate(self.members)})
        self.device = next(model.parameters()).device
        self.caches = [SlotCache(m, max_batch, self.max_len) for m in self.members]
        self.seqs: list[_Seq] = []  # row i holds seqs[i]
        self.logits: torch.Tensor | None = None  # (rows, V) next-token logits, row-aligned
        self.stats = Stats()
        self._queue: deque[Request] = deque()
        self._running: dict[int, Request] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    # ---- public, any thread -------------------------------------------------------------
    def start(self) -> "Batcher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmlab-batcher", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def active(self) -> int:
        """Sequences holding a row right now."""
        return len(self.seqs)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def check(self, prompt: Sequence[int], params: GenParams) -> None:
        """Refuse what could never run: raise LmlabError naming the limit."""
        if not prompt:
            raise LmlabError("the prompt has no tokens; give at least one")
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < self.vocab]
        if bad:
            raise LmlabError(f"token id {bad[0]!r} is outside the vocabulary [0, {self.vocab})")
        need = len(prompt) + max(params.max_tokens, 1) - 1
        if need > self.max_len:
            raise LmlabError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of "
                f"{self.max_len} tokens; shorten the prompt or ask for fewer tokens")
        if params.n > self.max_batch:
            raise LmlabError(f"n={params.n} is more than the server's {self.max_batch} batch rows")

    def submit_all(self, items: Sequence[tuple[Sequence[int], GenParams, Callable]]) -> list[Request]:
        """Queue several requests at once: all of them, or (QueueFull, LmlabError) none."""
        for prompt, params, _ in items:
            self.check(prompt, params)
        reqs = [Request(p, params, sink) for p, params, sink in items]
        with self._cond:
            if self._closing:
                raise LmlabError("the server is shutting down; retry against a running one")
            if len(self._queue) + len(reqs) > self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._queue.extend(reqs)
            self._cond.notify_all()
        return reqs

    def submit(self, prompt: Sequence[int], params: GenParams, sink: Callable) -> Request:
        return self.submit_all([(prompt, params, sink)])[0]

    # ---- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closing and not self._queue and not self.seqs:
                        self._cond.wait(timeout=1.0)
                    if self._closing:
                        break
                try:
                    self.step()
                except Exception:  # never let one bad step kill the server
                    log.exception("batch step failed; failing the running requests")
                    self._fail_running("generation failed inside the server; the error was logged")
        self._fail_running("the server shut down before this request finished")
        with self._cond:
            pending, self._queue = list(self._queue), deque()
        for req in pending:
            req.emit(Failed("the server shut down before this request started"))

    def step(self) -> None:
        """One scheduling step (the engine thread calls this; tests may too, without start)."""
        self._drop_cancelled()
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        if self.seqs:
            self._sample()
        if self.seqs:
            self._decode()

    def _fail_running(self, message: str) -> None:
        for req in list(self._running.values()):
            req.emit(Failed(message))
            self.stats.requests_failed += 1
        self._running.clear()
        self.seqs, self.logits = [], None

    def _free(self, rows: Sequence[int]) -> None:
        """Remove rows (any order); the last row moves into each hole."""
        for i in sorted(set(rows), reverse=True):
            last = len(self.seqs) - 1
            if i != last:
                self._copy_row(last, i, self.seqs[last].pos)
                self.seqs[i] = self.seqs[last]
                self.logits[i] = self.logits[last]
            self.seqs.pop()
        self.logits = self.logits[: len(self.seqs)] if self.seqs else None

    def _copy_row(self, src: int, dst: int, length: int) -> None:
        for cache in self.caches:
            cache.copy_row(src, dst, length)

    def _scores(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """One member's float logits, or the proxy-tuned combination of three."""
        if len(logits) == 1:
            return logits[0].float()
        return proxy_scores(*(x[..., : self.vocab].float() for x in logits), alpha=self.alpha)

    def _finish(self, seq_req: Request, event: Finished) -> None:
        seq_req.emit(event)
        seq_req.open_choices -= 1
        if seq_req.open_choices <= 0 and self._running.pop(seq_req.id, None) is not None:
            if seq_req.cancelled:
                self.stats.requests_cancelled += 1
            else:
                self.stats.requests_finished += 1

    def _drop_cancelled(self) -> None:
        gone = [i for i, s in enumerate(self.seqs) if s.req.cancelled]
        if gone:
            for i in gone:
                s = self.seqs[i]
                self._finish(s.req, Finished(s.choice, "cancelled", "", s.generated))
            self._free(gone)

    def _admit(self) -> list[Request]:
        admitted: list[Request] = []
        rows = len(self.seqs)
        width = 0
        with self._cond:
            while self._queue:
                req = self._queue[0]
                if req.cancelled:
                    self._queue.popleft()
                    self.stats.requests_cancelled += 1
                    continue
                need = req.params.n if req.params.max_tokens else 1
                new_width = max(width, len(req.prompt))
                if rows + need > self.max_batch:
                    break
                if admitted and new_width * (len(admitted) + 1) > self.max_prefill_tokens:
                    break
                self._queue.popleft()
                admitted.append(req)
                rows += need
                width = new_width
        return admitted

    def _new_seq(self, req: Request, choice: int) -> _Seq:
        p = req.params
        generator = None
        if p.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(p.seed + choice)
        seen = None
        if p.sampling.repetition_penalty:
            seen = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
            seen[torch.as_tensor(req.prompt, device=self.device)] = True
        return _Seq(req, choice, len(req.prompt), TextStream(self.decode, p.stop), generator, seen)

    def _prefill(self, reqs: list[Request]) -> None:
        # Generating requests first, so their rows stay dense with the running ones; prompt-
        # only requests (max_tokens 0) use rows past them for this one forward.
        reqs = sorted(reqs, key=lambda r: r.params.max_tokens == 0)
        first = len(self.seqs)
        m = len(reqs)
        width = max(len(r.prompt) for r in reqs)
        ids = torch.zeros(m, width, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, : len(r.prompt)] = torch.as_tensor(r.prompt)
            self._running[r.id] = r
            self.stats.prompt_tokens += len(r.prompt)
        ids = ids.to(self.device)
        positions = torch.arange(width, device=self.device).expand(m, width)
        hiddens = []
        for model, cache in zip(self.members, self.caches):
            cache.plan_prefill(first, m, width)
            mask = prefill_mask(m, width, model.config.sliding_window, self.device)
            hiddens.append(model.hidden_states(ids, positions=positions, cache=cache, attn_mask=mask))
        lengths = torch.tensor([len(r.prompt) for r in reqs], device=self.device)
        rows = torch.arange(m, device=self.device)
        last = self._scores([model.logits(h[rows, lengths - 1]) for model, h in zip(self.members, hiddens)])
        for i, r in enumerate(reqs):
            if r.params.prompt_logprobs is not None:
                r.emit(self._prompt_logprobs([h[i, : len(r.prompt)] for h in hiddens], r))
        new_seqs, new_logits = [], []
        gen = [(i, r) for i, r in enumerate(reqs) if r.params.max_tokens > 0]
        for i, r in gen:
            new_seqs.append(self._new_seq(r, 0))
            new_logits.append(last[i])
        row = first + len(gen)
        for i, r in gen:  # further choices copy the prompt's keys/values instead of recomputing
            for choice in range(1, r.params.n):
                self._copy_row(first + i, row, len(r.prompt))
                new_seqs.append(self._new_seq(r, choice))
                new_logits.append(last[i])
                row += 1
        for r in reqs:
            if r.params.max_tokens == 0:
                self._finish(r, Finished(0, "length", "", 0))
        if new_seqs:
            stacked = torch.stack(new_logits)
            self.logits = stacked if self.logits is None else torch.cat([self.logits, stacked])
            self.seqs.extend(new_seqs)
            self.stats.peak_active = max(self.stats.peak_active, len(self.seqs))

    def _prompt_logprobs(self, hiddens: list[torch.Tensor], req: Request) -> PromptLogprobs:
        """log p(prompt[t] | prompt[:t]) for t >= 1, from the prefill's own hidden states."""
        k = req.params.prompt_logprobs
        if len(req.prompt) < 2:
            return PromptLogprobs([None], [None] if k else None)
        lp = self._scores([m.logits(h[:-1]) for m, h in zip(self.members, hiddens)]).log_softmax(-1)
        target = torch.as_tensor(req.prompt[1:], device=lp.device)
        chosen = lp.gather(-1, target[:, None]).squeeze(-1).tolist()
        top = None
        if k:
            values, index = lp.topk(min(k, lp.shape[-1]), dim=-1)
            top = [None] + [list(zip(i, v)) for i, v in zip(index.tolist(), values.tolist())]
        return PromptLogprobs([None] + chosen, top)

    def _sample(self) -> None:
        seqs, logits = self.seqs, self.logits
        for i, s in enumerate(seqs):
            if s.seen is not None:
                logits[i] = apply_repetition_penalty(logits[i], s.seen, s.req.params.sampling.repetition_penalty)
        logprobs = logits.log_softmax(-1)
        tokens = logits.argmax(-1).tolist()
        for i, s in enumerate(seqs):
            sp = s.req.params.sampling
            if sp.temperature > 0:
                scores = process_logits(logits[i:i + 1], sp.temperature, sp.top_k, sp.top_p, sp.min_p)
                tokens[i] = int(sample(scores, sp.temperature, s.generator)[0])
        token_t = torch.tensor(tokens, device=self.device)
        chosen = logprobs.gather(-1, token_t[:, None]).squeeze(-1).tolist()
        k_max = max((s.req.params.logprobs or 0) for s in seqs)
        top_v = top_i = None
        if k_max:
            values, index = logprobs.topk(min(k_max, logprobs.shape[-1]), dim=-1)
            top_v, top_i = values.tolist(), index.tolist()
        done = []
        for i, s in enumerate(seqs):
            p = s.req.params
            tok = tokens[i]
            s.last, s.generated = tok, s.generated + 1
            if s.seen is not None:
                s.seen[tok] = True
            top = None
            if p.logprobs is not None:
                k = p.logprobs
                top = list(zip(top_i[i][:k], top_v[i][:k])) if k else []
            reason = None
            if tok in p.stop_ids:
                text, reason = "", "eos"
            else:
                text, stopped = s.text.push(tok)
                if stopped:
                    reason = "stop"
            if reason is None and s.generated >= p.max_tokens:
                reason = "length"
            s.req.emit(Token(s.choice, tok, chosen[i], top, text, reason == "eos"))
            if reason is not None:
                tail = s.text.flush() if reason != "stop" else ""
                self._finish(s.req, Finished(s.choice, reason, tail, s.generated))
                done.append(i)
        self.stats.generated_tokens += len(seqs)
        self.stats.recent.append((time.monotonic(), len(seqs)))
        if done:
            self._free(done)

    def _decode(self) -> None:
        seqs = self.seqs
        tokens = torch.tensor([s.last for s in seqs], device=self.device)
        positions = torch.tensor([s.pos for s in seqs], device=self.device)
        width = int(positions.max()) + 1
        logits = []
        for model, cache in zip(self.members, self.caches):
            cache.plan_decode(positions)
            mask = decode_mask(positions, width, model.config.sliding_window)
            logits.append(model(tokens[:, None], positions=positions[:, None], cache=cache, attn_mask=mask)[:, -1])
        self.logits = self._scores(logits)
        for s in seqs:
            s.pos += 1


# ---- a blocking helper for scripts and tests ---------------------------------------------

@dataclass
class Choice:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


def collect(batcher: Batcher, prompt: Sequence[int], params: GenParams, timeout: float = 60.0):
    """Submit one request and block until it ends: (choices, prompt log-probs or None)."""
    import queue

    events: queue.Queue = queue.Queue()
    batcher.submit(prompt, params, events.put)
    choices = [Choice() for _ in range(params.n)]
    prompt_lp = None
    open_choices = params.n if params.max_tokens else 1
    deadline = time.monotonic() + timeout
    while open_choices:
        ev = events.get(timeout=max(0.0, deadline - time.monotonic()))
        if isinstance(ev, Failed):
            raise LmlabError(ev.message)
        if isinstance(ev, PromptLogprobs):
            prompt_lp = ev
        elif isinstance(ev, Token):
            c = choices[ev.choice]
            c.tokens.append(ev.token)
            c.logprobs.append(ev.logprob)
            c.text += ev.text
        elif isinstance(ev, Finished):
            choices[ev.choice].text += ev.text
            choices[ev.choice].finish_reason = ev.reason
            open_choices -= 1
    return choices, prompt_lp
