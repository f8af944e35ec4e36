"""Best-of-N sampling under any `Reward`, and the expected best-of-n curve of one sample pool.

    pool = sample_pool(model, tokenizer, prompts, n=16, max_new_tokens=24, temperature=1.0)
    picked = best_of_n(pool, reward)              # the argmax answer of each prompt
    picked.kl                                     # log n - (n - 1) / n, beside the gold reward

The N samples of every prompt are drawn in one batched decode (each prompt repeated N times;
`batch_rows` caps the rows per decode call when N * prompts is large). The reward scores
(prompt, answer) pairs as its training data rendered them: for a chat model, the user turn
and the assistant answer, closed.

An empty answer (the model ended at once) cannot be rendered as an assistant turn, which
the chat reader refuses, so it is never shown to the reward and ranks last (-inf); a prompt
whose N answers are all empty has no best answer.

`expected_best_of_n` turns one pool of N_max samples into the *expected* proxy and gold
reward of best-of-n for every n <= N_max, without resampling: among N_max samples sorted by
proxy score, the i-th smallest is the maximum of a uniformly random n-subset with
probability C(i-1, n-1) / C(N_max, n) (the estimator of Nakano et al. 2021, WebGPT).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from lmlab.errors import LmlabError
from lmlab.train.rl import best_of_n_kl


@dataclass
class SamplePool:
    """N answers per prompt: `answers[p][j]` and its finish reason ("eos" or "length")."""
    prompts: list[str]
    answers: list[list[str]]
    finish_reasons: list[list[str]]

    @property
    def n(self) -> int:
        return len(self.answers[0]) if self.answers else 0

    def flat(self) -> tuple[list[str], list[str], list[str]]:
        """(prompt, answer, finish reason) of every sample, prompt-major."""
        prompts = [p for p, row in zip(self.prompts, self.answers) for _ in row]
        return prompts, [a for row in self.answers for a in row], [f for row in self.finish_reasons for f in row]


def check_n(n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise LmlabError(f"best-of-N needs n >= 1 samples per prompt, got {n!r}")
    return n


def check_prompts(prompts: Sequence[str], where: str = "prompts") -> list[str]:
    prompts = list(prompts)
    if not prompts:
        raise LmlabError(f"no {where} to sample answers for; give at least one prompt")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise LmlabError(f"{where}: item {bad[0]} is not a non-empty string prompt")
    return prompts


def sample_pool(model, tokenizer, prompts: Sequence[str], n: int, max_new_tokens: int, *,
                temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                seed: int = 0, batch_rows: int | None = None, precision=None) -> SamplePool:
    """N samples per prompt from a chat model (lmlab role-token template), in batched decodes
    of at most `batch_rows` rows (default: all N * len(prompts) rows at once)."""
    from contextlib import nullcontext

    from lmlab.data.chat import RoleTokenTemplate
    from lmlab.decode.generate import generate

    check_n(n)
    prompts = check_prompts(prompts)
    if batch_rows is not None and batch_rows < 1:
        raise LmlabError(f"batch_rows must be >= 1, got {batch_rows}")
    template = RoleTokenTemplate(tokenizer)
    encoded = [template.encode_prompt([{"role": "user", "content": p}]) for p in prompts]
    rows = [ids for ids in encoded for _ in range(n)]
    step = batch_rows or len(rows)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    was_training = model.training
    model.eval()
    outs = []
    try:
        with torch.no_grad(), (precision.autocast() if precision is not None else nullcontext()):
            for k, start in enumerate(range(0, len(rows), step)):
                # One seed per chunk: the pool is reproducible for a given batch_rows.
                outs += generate(model, rows[start:start + step], max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, eos_id=template.stop_ids[0], seed=seed + k,
                                 pad_id=pad)
    finally:
        model.train(was_training)
    texts = [tokenizer.decode(o.tokens[:-1] if o.finish_reason == "eos" else o.tokens).strip() for o in outs]
    reasons = [o.finish_reason for o in outs]
    return SamplePool(prompts, [texts[i * n:(i + 1) * n] for i in range(len(prompts))],
                      [reasons[i * n:(i + 1) * n] for i in range(len(prompts))])


def score_pool(pool: SamplePool, reward) -> np.ndarray:
    """(P, N) scores of every sample under `reward`; empty answers get -inf."""
    prompts, answers, _ = pool.flat()
    keep = [i for i, a in enumerate(answers) if a.strip()]
    scores = np.full(len(answers), -np.inf, dtype=np.float64)
    if keep:
        got = reward.score([prompts[i] for i in keep], [answers[i] for i in keep])
        got = got.detach().double().cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got, float)
        if got.shape != (len(keep),):
            raise LmlabError(f"the reward returned {got.shape} scores for {len(keep)} answers; a Reward's "
                             "score() returns one number per (prompt, completion)")
        scores[keep] = got
    return scores.reshape(len(pool.prompts), pool.n)


def gold_pool(pool: SamplePool, kind: str = "dense") -> np.ndarray:
    """(P, N) SortWorld gold rewards, with whether each answer ended from its finish reason."""
    from lmlab.worlds.evaluate import sort_rewards

    prompts, answers, reasons = pool.flat()
    out = sort_rewards(prompts, answers, reasons)[f"gold_{kind}"]
    return np.asarray(out, dtype=np.float64).reshape(len(pool.prompts), pool.n)


@dataclass
class BestOfN:
    n: int
    index: list[int | None]  # per prompt, the chosen sample (None: every answer was empty)
    scores: np.ndarray  # (P, N) proxy scores

    @property
    def kl(self) -> float:
        return best_of_n_kl(self.n)

    def best_scores(self) -> list[float | None]:
        return [None if j is None else float(self.scores[p, j]) for p, j in enumerate(self.index)]


def pick_best(scores: np.ndarray) -> list[int | None]:
    """Per row, the index of the highest score (the first on ties); None where all are -inf."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise LmlabError(f"need a (prompts, N) score matrix with N >= 1, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise LmlabError("the reward returned NaN scores; check the reward model")
    best = scores.argmax(1)
    return [None if np.isneginf(scores[p, j]) else int(j) for p, j in enumerate(best)]


def best_of_n(pool: SamplePool, reward) -> BestOfN:
    """The highest-scoring answer of each prompt's N under `reward` (any Reward)."""
    scores = score_pool(pool, reward)
    return BestOfN(pool.n, pick_best(scores), scores)


def chosen_records(pool: SamplePool, picked: BestOfN) -> list[dict]:
    """The best answers as chat JSONL records (prompts without one are left out)."""
    return [{"messages": [{"role": "user", "content": pool.prompts[p]},
                          {"role": "assistant", "content": pool.answers[p][j]}]}
            for p, j in enumerate(picked.index) if j is not None]


def selection_probs(n_max: int, n: int) -> np.ndarray:
    """P(the i-th smallest of n_max samples is the max of a random n-subset), i = 1..n_max:
    C(i-1, n-1) / C(n_max, n)."""
    if not 1 <= n <= n_max:
        raise LmlabError(f"best-of-{n} needs 1 <= n <= {n_max} (the samples in the pool)")
    total = math.comb(n_max, n)
    return np.array([math.comb(i - 1, n - 1) / total for i in range(1, n_max + 1)], dtype=np.float64)


def expected_best_of_n(proxy: np.ndarray, values: np.ndarray, ns: Sequence[int]) -> dict[int, float]:
    """E[values of the proxy-argmax of n random samples of a prompt], averaged over prompts,
    for each n in `ns`. Ties in proxy are broken by sample order (stable sort), as
    `pick_best` does for the first n samples."""
    proxy, values = np.asarray(proxy, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if proxy.shape != values.shape or proxy.ndim != 2:
        raise LmlabError(f"proxy {proxy.shape} and values {values.shape} must be the same (prompts, N) shape")
    n_max = proxy.shape[1]
    # Ascending by proxy, ties with the *later* sample first, so the earliest of equal
    # scores ranks highest (as argmax keeps the first).
    order = np.lexsort((-np.arange(n_max)[None, :].repeat(len(proxy), 0), proxy), axis=1)
    ranked = np.take_along_axis(values, order, 1)
    out = {}
    for n in ns:
        probs = selection_probs(n_max, int(n))
        # A sample that is never the maximum adds nothing, even when its value is -inf.
        used = probs > 0
        out[int(n)] = float((ranked[:, used] * probs[used]).sum(1).mean())
    return out


def powers_of_two(n_max: int) -> list[int]:
    """1, 2, 4, ... up to n_max (and n_max itself)."""
    out, n = [], 1
    while n <= n_max:
        out.append(n)
        n *= 2
    return out if out[-1] == n_max else out + [n_max]


def reward_from_spec(spec, ensemble: str = "mean", k: float = 1.0, batch_size: int = 64,
                     device: str = "cpu"):
    """A `Reward` from a recipe value: "gold" / "gold:dense" / "gold:sparse" (SortWorld's
    programmatic reward, answers taken as ended), a reward-model directory (a trained RM or
    a WARM average), or a list of directories (ENS of them, `ensemble` = mean |
    mean_minus_std). Every directory is opened, and refused if it is not a reward model,
    before anything is sampled."""
    from lmlab.rewards.base import EnsembleReward, GoldReward, ModelReward

    items = [spec] if isinstance(spec, str) else list(spec or ())
    if not items or any(not isinstance(s, str) or not s.strip() for s in items):
        raise LmlabError(f"reward must be 'gold', 'gold:sparse', a reward model directory or a list of them; "
                         f"got {spec!r}")
    golds = [s for s in items if s == "gold" or s.startswith("gold:")]
    if golds:
        if len(items) > 1:
            raise LmlabError("the gold reward cannot be ensembled with reward models; use 'gold' alone")
        kind = golds[0].partition(":")[2] or "dense"
        return GoldReward("sort", kind, ended=True)
    members = [ModelReward.from_dir(s, batch_size=batch_size, device=device) for s in items]
    return members[0] if len(members) == 1 else EnsembleReward(members, mode=ensemble, k=k)
