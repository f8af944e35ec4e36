"""Reinforcement-learning arithmetic as pure functions of tensors: advantages, returns,
normalisation, target-network updates. No model, no sampling, no loop.

Per-token tensors are (B, T) with a `mask` true on the real (completion) tokens, the ones the
policy chose; prompt, padding and tool-output tokens are false. Formulas and the references
they were checked against: docs/alignment.md.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from lmlab.errors import LmlabError


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over (B, T) per-token rewards
    and values; returns (advantages, returns), both 0 on masked tokens.

    `delta_t = r_t + gamma V_next - V_t` and `A_t = delta_t + gamma lam A_next`, where "next"
    is the next *real* token: the recursion jumps over masked ones (a tool's output between
    two turns is not an action), and their rewards and values are ignored. After a row's
    last real token the episode ends (V_next = 0). `returns = A + V` are the value targets.
    lam = 0 gives the one-step TD error, lam = 1 the Monte-Carlo return minus V."""
    if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise LmlabError(f"gae wants rewards, values and mask of one (B, T) shape; got "
                         f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}")
    mask = mask.bool()
    rewards, values = rewards.float(), values.float()
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[1])):
        real = mask[:, t]
        adv = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_adv
        advantages[:, t] = torch.where(real, adv, 0.0)
        # A masked token leaves the carried state as it was: the next real token's.
        next_value = torch.where(real, values[:, t], next_value)
        next_adv = torch.where(real, adv, next_adv)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Scale `x` to unit standard deviation over its real entries (population std,
    `rsqrt(var + eps)`); with `shift_mean` also to mean 0, otherwise the mean is kept
    (`(x - mu) / sigma + mu`, as for PPO's rewards). Masked entries come back 0."""
    mask = mask.bool()
    n = mask.sum()
    if n == 0:
        raise LmlabError("whiten: the mask selects no entry; nothing to normalise")
    x = x.float()
    mean = torch.where(mask, x, 0.0).sum() / n
    var = torch.where(mask, (x - mean) ** 2, 0.0).sum() / n
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0.0)


# ---------------------------------------------------------------- group baselines
# rewards (N,) for N = prompts * group_size completions, a prompt's group contiguous
# (prompt 0's completions first), as samplers emit them.

def grpo_advantages(grouped: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024): `(r - mean_g) / (std_g + eps)`, std with Bessel's correction
    (as TRL); a group of one has no spread and gets 0."""
    centred = grouped - grouped.mean(-1, keepdim=True)
    if grouped.shape[-1] == 1:
        return centred
    return centred / (grouped.std(-1, keepdim=True) + eps)


def dr_grpo_advantages(grouped: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): `r - mean_g`; dividing by the std up-weights prompts that
    are nearly always solved or failed, a difficulty bias."""
    return grouped - grouped.mean(-1, keepdim=True)


def rloo_advantages(grouped: torch.Tensor) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): `r - mean of the other k-1` (an unbiased baseline since
    it does not depend on the sample itself); k = 1 has no other sample and gets 0."""
    k = grouped.shape[-1]
    if k == 1:
        return torch.zeros_like(grouped)
    others = (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)
    return grouped - others


GROUP_ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
}


def group_advantages(rewards: torch.Tensor, group_size: int, method: str = "grpo", **params) -> torch.Tensor:
    """Per-completion advantages (N,) from scalar rewards (N,) by the group baseline `method`
    (a key of GROUP_ADVANTAGES); `eps` is a parameter of "grpo"."""
    if method not in GROUP_ADVANTAGES:
        raise LmlabError(f"unknown group advantage {method!r}; choose one of {sorted(GROUP_ADVANTAGES)}")
    extra = set(params) - ({"eps"} if method == "grpo" else set())
    if extra:
        raise LmlabError(f"group advantage {method!r} takes no parameter {sorted(extra)}"
                         + (" (only eps)" if method == "grpo" else ""))
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise LmlabError(f"group_advantages wants rewards of shape (prompts * group_size,); got "
                         f"{tuple(rewards.shape)} with group_size {group_size}")
    grouped = rewards.float().view(-1, group_size)
    return GROUP_ADVANTAGES[method](grouped, **params).view(-1)


# ---------------------------------------------------------------- target networks

@torch.no_grad()
def ema_update(target_params: Iterable[torch.Tensor], source_params: Iterable[torch.Tensor],
               eta: float) -> None:
    """In place, `target <- (1 - eta) target + eta source`, parameter by parameter: eta = 0
    keeps the target, eta = 1 copies the source (exactly). Pass `model.parameters()`."""
    if not 0.0 <= eta <= 1.0:
        raise LmlabError(f"eta must be in [0, 1] (0 keeps the target, 1 copies the source), got {eta}")
    targets, sources = list(target_params), list(source_params)
    if len(targets) != len(sources):
        raise LmlabError(f"target has {len(targets)} parameters, source {len(sources)}: "
                         "update a copy of the same architecture")
    for t, s in zip(targets, sources):
        if t.shape != s.shape:
            raise LmlabError(f"parameter shapes differ, {tuple(t.shape)} vs {tuple(s.shape)}: "
                             "update a copy of the same architecture")
        if eta == 1.0:
            t.copy_(s)
        elif eta != 0.0:
            t.mul_(1.0 - eta).add_(s.to(t.dtype), alpha=eta)


def soft_update(target_params: Iterable[torch.Tensor], source_params: Iterable[torch.Tensor],
                alpha: float) -> None:
    """TR-DPO's soft reference update (Gorbatovski et al. 2024): `ref <- alpha policy +
    (1 - alpha) ref`, i.e. `ema_update` with eta = alpha."""
    ema_update(target_params, source_params, alpha)


def hard_update(target_params: Iterable[torch.Tensor], source_params: Iterable[torch.Tensor]) -> None:
    """Copy the source into the target (TR-DPO's hard update every tau steps)."""
    ema_update(target_params, source_params, 1.0)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = `log n - (n - 1) / n` (Stiennon et al. 2020; exact for a
    continuous reward, an upper bound with ties, Beirami et al. 2024)."""
    if n < 1:
        raise LmlabError(f"best-of-n needs n >= 1 samples, got {n}")
    return math.log(n) - (n - 1) / n
