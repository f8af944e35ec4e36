"""Evaluation on the worlds: gold reward, exact match, KL to a reference policy, and the
gold-vs-proxy-reward-against-KL plot that shows reward hacking.

Everything here takes strings and numbers (generated answers, finish reasons, per-token
log-probabilities), never a model: sampling belongs to `lmlab.decode`.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from lmlab.errors import LmlabError
from lmlab.io import atomic_path
from lmlab.worlds.sort import END, gold_reward, gold_reward_sparse, parse_prompt


def ended_from_finish_reason(reason: str) -> bool:
    """A generation ended on its own unless it ran out of tokens ("length")."""
    return reason != "length"


def sort_rewards(prompts: Sequence[str], answers: Sequence[str],
                 finish_reasons: Sequence[str] | None = None) -> dict[str, list[float]]:
    """Per-answer dense and sparse gold rewards. Without `finish_reasons`, whether an answer
    ended is read from the END marker in its text."""
    if len(prompts) != len(answers) or (finish_reasons is not None and len(finish_reasons) != len(answers)):
        raise LmlabError(f"got {len(prompts)} prompts, {len(answers)} answers"
                         + ("" if finish_reasons is None else f" and {len(finish_reasons)} finish reasons")
                         + "; pass one of each per sample")
    dense, sparse = [], []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        symbols = parse_prompt(prompt).symbols
        ended = None if finish_reasons is None else ended_from_finish_reason(finish_reasons[i])
        dense.append(gold_reward(symbols, answer, ended))
        sparse.append(gold_reward_sparse(symbols, answer, ended))
    return {"gold_dense": dense, "gold_sparse": sparse}


def normalize_answer(text: str) -> str:
    """First line before any END marker, lowercased, without surrounding spaces or a final period."""
    head = text.partition(END)[0].strip().split("\n", 1)[0]
    return head.strip().rstrip(".").strip().lower()


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    if len(predictions) != len(references) or not references:
        raise LmlabError(f"exact match needs one prediction per reference (got {len(predictions)} "
                         f"and {len(references)}, at least one)")
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)) / len(references)


def kl_per_sample(policy_logprobs: Sequence[Sequence[float]], ref_logprobs: Sequence[Sequence[float]]) -> np.ndarray:
    """log pi(y|x) - log pi_ref(y|x) for each sample y ~ pi: the sum over its tokens of the
    two policies' log-probabilities of the *sampled* tokens. Its mean over samples is an
    unbiased estimate of KL(pi || pi_ref)."""
    if len(policy_logprobs) != len(ref_logprobs):
        raise LmlabError(f"{len(policy_logprobs)} policy samples but {len(ref_logprobs)} reference ones; "
                         "score the same samples under both policies")
    out = np.empty(len(policy_logprobs), dtype=np.float64)
    for i, (lp, lr) in enumerate(zip(policy_logprobs, ref_logprobs)):
        lp, lr = np.asarray(lp, dtype=np.float64), np.asarray(lr, dtype=np.float64)
        if lp.shape != lr.shape:
            raise LmlabError(f"sample {i}: {lp.size} policy log-probs but {lr.size} reference ones; "
                             "both must score the same generated tokens")
        out[i] = float(np.sum(lp - lr))
    return out


def kl_estimate(policy_logprobs: Sequence[Sequence[float]], ref_logprobs: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(mean, standard error) of the per-sample KL estimate."""
    per = kl_per_sample(policy_logprobs, ref_logprobs)
    if per.size == 0:
        raise LmlabError("KL needs at least one sample")
    se = float(per.std(ddof=1) / math.sqrt(per.size)) if per.size > 1 else float("nan")
    return float(per.mean()), se


def reward_kl_point(prompts: Sequence[str], answers: Sequence[str], finish_reasons: Sequence[str] | None,
                    proxy_rewards: Sequence[float], policy_logprobs: Sequence[Sequence[float]],
                    ref_logprobs: Sequence[Sequence[float]]) -> dict[str, float]:
    """One point of the reward-hacking picture for a batch of samples from one policy:
    mean gold (dense and sparse) and proxy reward, and the KL estimate to the reference."""
    if len(proxy_rewards) != len(answers):
        raise LmlabError(f"{len(proxy_rewards)} proxy rewards for {len(answers)} answers; score every answer")
    gold = sort_rewards(prompts, answers, finish_reasons)
    kl, kl_se = kl_estimate(policy_logprobs, ref_logprobs)
    return {"kl": kl, "kl_se": kl_se, "gold": float(np.mean(gold["gold_dense"])),
            "gold_sparse": float(np.mean(gold["gold_sparse"])), "proxy": float(np.mean(proxy_rewards))}


def plot_reward_vs_kl(points: Sequence[Mapping[str, float]], path, title: str = "gold vs proxy reward") -> None:
    """Gold and proxy reward (two y-axes: their scales differ) against KL to the reference,
    one point per checkpoint or KL budget. Written atomically as PNG."""
    if not points:
        raise LmlabError("nothing to plot: pass at least one {'kl', 'gold', 'proxy'} point")
    missing = [k for k in ("kl", "gold", "proxy") if any(k not in p for p in points)]
    if missing:
        raise LmlabError(f"every plot point needs keys kl, gold and proxy; missing {missing}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(points, key=lambda p: p["kl"])
    kl = [p["kl"] for p in pts]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(kl, [p["gold"] for p in pts], "o-", color="tab:green", label="gold reward")
    ax.set_xlabel("KL(policy || reference) [nats]")
    ax.set_ylabel("gold reward", color="tab:green")
    ax2 = ax.twinx()
    ax2.plot(kl, [p["proxy"] for p in pts], "s--", color="tab:red", label="proxy reward")
    ax2.set_ylabel("proxy reward", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
