"""Preference and policy-gradient losses as pure functions of tensors: no model, no loop.

Shapes: `(B,)` for one value per sequence or pair, `(B, T)` for one value per token, with a
`mask` of the same shape that is true on real (completion) tokens. Per-pair and per-token
losses come back unreduced; the caller (an objective) picks the reduction, so the same
function serves a micro-batch and an accumulated batch alike.

Families are tables (name -> function), so a variant is added by one entry, and a config
string selects it through `dpo_loss`, `kl_penalty` or `aggregate_loss`, which reject unknown
names and parameters with the list of valid ones. The formulas, their references and the
oracles the tests compare against are in docs/alignment.md.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError


def call_table(table: dict[str, Callable], kind: str, name: str, *args, **params):
    """`table[name](*args, **params)`, with a fix-naming error for a wrong name or parameter
    (a typo in a config would otherwise be a TypeError deep inside a training step)."""
    if name not in table:
        raise LmlabError(f"unknown {kind} {name!r}; choose one of {sorted(table)}")
    fn = table[name]
    try:
        inspect.signature(fn).bind(*args, **params)
    except TypeError as e:
        accepted = [p for p in inspect.signature(fn).parameters][len(args):]
        raise LmlabError(f"{kind} {name!r} takes the parameters {accepted}, got {sorted(params)}: {e}") from None
    return fn(*args, **params)


# ---------------------------------------------------------------- reward models

def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin: torch.Tensor | float | None = None) -> torch.Tensor:
    """Per-pair `-log sigmoid(r_c - r_r - margin)`: the negative log-likelihood that the chosen
    answer wins under Bradley-Terry. The margin (Llama 2) asks for a larger gap on pairs
    labelled as clearly better."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def reward_centering_term(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """`mean((r_c + r_r)^2)`: the Bradley-Terry loss sees only differences, so rewards can drift
    by a constant; this auxiliary term (Eisenstein et al. 2023) pins their mean near 0.
    The caller multiplies it by a small coefficient (e.g. 0.01)."""
    return ((r_chosen + r_rejected) ** 2).mean()


# ---------------------------------------------------------------- DPO family
# Every variant takes summed log-probs of the completions, shape (B,), and returns (B,).
# h = (pi_c - ref_c) - (pi_r - ref_r) is the difference of implicit log-ratios.

def _logratio_gap(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)


def dpo_sigmoid(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor,
                beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): `-log sigmoid(beta * h)`."""
    return -F.logsigmoid(beta * _logratio_gap(pc, pr, rc, rr))


def dpo_cdpo(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Conservative DPO (Mitchell 2023): the labels are flipped with probability eps, so the
    target is the expected loss `-(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)`.
    Unlike plain DPO it has a finite minimiser, at beta*h = log((1-eps)/eps)."""
    _check_smoothing(label_smoothing, upper=1.0)
    z = beta * _logratio_gap(pc, pr, rc, rr)
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpo_robust(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024), as in TRL's "robust": an unbiased estimate of the
    clean-label loss under flip rate eps,
    `(-(1-eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)`."""
    _check_smoothing(label_smoothing, upper=0.5)
    z = beta * _logratio_gap(pc, pr, rc, rr)
    return (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (1 - 2 * label_smoothing)


def dpo_hinge(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    """Hinge loss of SLiC (Zhao et al. 2023) / RSO (Liu et al. 2024): `max(0, 1 - beta h)`."""
    return torch.relu(1 - beta * _logratio_gap(pc, pr, rc, rr))


def dpo_ipo(pc, pr, rc, rr, beta: float, chosen_lengths: torch.Tensor | None = None,
            rejected_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17) in TRL's form: `(h_avg - 1/(2 beta))^2` on log-ratios
    averaged over completion tokens, which keeps beta meaningful across lengths.

    Either pass per-token-averaged log-probs, or summed ones with `chosen_lengths` and
    `rejected_lengths` (completion tokens per sequence; both or neither) to average here."""
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise LmlabError("ipo: pass both chosen_lengths and rejected_lengths, or neither "
                         "(then the log-probs must already be per-token averages)")
    chosen, rejected = pc - rc, pr - rr
    if chosen_lengths is not None:
        chosen = chosen / chosen_lengths.clamp(min=1)
        rejected = rejected / rejected_lengths.clamp(min=1)
    return (chosen - rejected - 1 / (2 * beta)) ** 2


def dpo_ipo_sum(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    """IPO on summed log-probs (OpenRLHF's form): `(h - 1/(2 beta))^2`. The optimum gap is
    per sequence, so long completions get a weaker per-token push than with `ipo`."""
    return (_logratio_gap(pc, pr, rc, rr) - 1 / (2 * beta)) ** 2


def _check_smoothing(eps: float, upper: float) -> None:
    if not 0.0 <= eps < upper:
        raise LmlabError(f"label_smoothing must be in [0, {upper}), got {eps}")


DPO_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": dpo_sigmoid,
    "cdpo": dpo_cdpo,
    "robust": dpo_robust,
    "hinge": dpo_hinge,
    "ipo": dpo_ipo,
    "ipo_sum": dpo_ipo_sum,
}


def dpo_loss(variant: str, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             **params) -> torch.Tensor:
    """Per-pair loss (B,) of the DPO variant named `variant` (a key of DPO_LOSSES)."""
    if beta <= 0:
        raise LmlabError(f"beta must be > 0, got {beta}")
    return call_table(DPO_LOSSES, "DPO loss", variant, policy_chosen_logps, policy_rejected_logps,
                      ref_chosen_logps, ref_rejected_logps, beta, **params)


@torch.no_grad()
def dpo_metrics(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                beta: float) -> dict[str, torch.Tensor]:
    """Implicit rewards `beta (log pi - log ref)` of each answer (B,), their margins (B,), and
    the fraction of pairs whose chosen reward is strictly higher (a scalar). Detached."""
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    return {"rewards_chosen": chosen, "rewards_rejected": rejected, "margins": chosen - rejected,
            "accuracy": (chosen > rejected).float().mean()}


def with_nll(loss: torch.Tensor, chosen_nll: torch.Tensor, weight: float) -> torch.Tensor:
    """`loss + weight * chosen_nll`: DPO plus the negative log-likelihood of the chosen answer
    (Llama 3 uses weight 0.2; RPO, Pang et al. 2024). Pass the NLL per token-averaged, as RPO
    and TRL's "sft" term do, so the weight does not scale with answer length."""
    return loss + weight * chosen_nll


# ---------------------------------------------------------------- PPO pieces

def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_low: float = 0.2, clip_high: float | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate (Schulman et al. 2017), per token (B, T), 0 on masked tokens.

    `max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))` with `r = exp(logp - old_logp)`;
    `clip_high` > `clip_low` is DAPO's clip-higher (default: symmetric). `advantages` is
    (B, T) or (B,) (one per sequence, as in GRPO). Also returns, over real tokens, the
    fraction where the clipped branch is the active one (its gradient is zero), and the
    approximate KL(old || new) by the k3 estimator (samples come from the old policy)."""
    if clip_high is None:
        clip_high = clip_low
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    mask = mask.bool()
    # Masked before use: padding may carry -inf log-probs, and inf - inf = nan would leak
    # into the gradient through the unselected branch of a later torch.where.
    log_ratio = torch.where(mask, logp - old_logp, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = torch.where(mask, torch.maximum(unclipped, clipped), 0.0)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        clip_fraction = ((clipped > unclipped) & mask).sum() / n
        approx_kl = torch.where(mask, (ratio - 1) - log_ratio, 0.0).sum() / n
    return per_token, clip_fraction, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: float | None = 0.2) -> torch.Tensor:
    """Clipped value loss per token (B, T), 0 on masked tokens:
    `0.5 * max((V - R)^2, (V_clip - R)^2)` with `V_clip = V_old + clip(V - V_old, -clip, clip)`.

    The 0.5 is inside (OpenAI baselines / TRL's PPO convention), so the gradient of an
    unclipped token is `V - R`; `clip=None` gives the plain 0.5 squared error."""
    mask = mask.bool()
    values, old_values, returns = (torch.where(mask, x, 0.0) for x in (values, old_values, returns))
    err = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        err = torch.maximum(err, (clipped - returns) ** 2)
    return torch.where(mask, 0.5 * err, 0.0)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of softmax(logits) along the last axis: `logsumexp(z) - sum p z`.
    Tokens of probability 0 (logit -inf, e.g. a banned token) contribute 0, not 0 * -inf."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits.masked_fill(probs == 0, 0.0)).sum(-1)


@torch.no_grad()
def entropy_from_logprobs(logprobs: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """Entropy in nats, `-sum p log p`, from (N, V) log-probabilities, without gradient.

    For an entropy that is only reported: it reuses the log-softmax a loss already computed
    and works `rows` rows at a time, so no further (N, V) temporary is allocated (at a large
    vocabulary each one is a fresh, page-faulted block of memory). Log-probs of -inf
    (probability 0) contribute 0."""
    flat = logprobs.reshape(-1, logprobs.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    floor = torch.finfo(torch.float32).min
    for s in range(0, flat.shape[0], rows):
        lp = flat[s:s + rows].float()
        # -inf -> the most negative float: 0 * finite = 0, where 0 * -inf would be nan.
        out[s:s + rows] = -(lp.exp() * lp.clamp(min=floor)).sum(-1)
    return out.view(logprobs.shape[:-1])


# ---------------------------------------------------------------- KL estimators
# Per-token estimates of KL(p || q) from tokens sampled from p (Schulman, "Approximating KL
# divergence", 2020): p is the sampling policy (the current policy), q the reference.
# With log r = log q - log p: k1 = -log r is unbiased but can be negative; k2 = (log r)^2 / 2
# is biased, low variance; k3 = (r - 1) - log r is unbiased and never negative.

def kl_k1(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    return logp - logq


def kl_k2(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - logq) ** 2


def kl_k3(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    log_r = logq - logp
    return torch.exp(log_r) - 1 - log_r


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1, "k2": kl_k2, "k3": kl_k3,
}


def kl_penalty(logp: torch.Tensor, logq: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(p || q); tokens sampled from p (`logp` their log-probs)."""
    return call_table(KL_ESTIMATORS, "KL estimator", estimator, logp, logq)


# ---------------------------------------------------------------- loss aggregation
# How per-token losses (B, T) become one scalar. The choice changes what a long answer weighs:
# token_mean weighs every token alike (DAPO); seq_mean_token_mean weighs every sequence alike,
# so a token of a short answer counts more (GRPO's original, the length bias Dr. GRPO points
# out); seq_mean_token_sum_norm divides sums by a fixed constant, neither length-biased nor
# batch-dependent (Dr. GRPO).

def token_mean(per_token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(per_token_loss.dtype)
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1)


def seq_mean_token_mean(per_token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(per_token_loss.dtype)
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def seq_mean_token_sum_norm(per_token_loss: torch.Tensor, mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """`sum / (B * max_len)`: `max_len` is the generation budget (max new tokens), a constant
    of the run, not the padded width of this batch."""
    if max_len <= 0:
        raise LmlabError(f"max_len must be the positive generation budget (max new tokens), got {max_len}")
    mask = mask.to(per_token_loss.dtype)
    return (per_token_loss * mask).sum() / (per_token_loss.shape[0] * max_len)


LOSS_AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "token_mean": token_mean,
    "seq_mean_token_mean": seq_mean_token_mean,
    "seq_mean_token_sum_norm": seq_mean_token_sum_norm,
}


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean",
                   **params) -> torch.Tensor:
    """Scalar loss from per-token losses by the rule `mode` (a key of LOSS_AGGREGATIONS)."""
    return call_table(LOSS_AGGREGATIONS, "loss aggregation", mode, per_token_loss, mask, **params)

