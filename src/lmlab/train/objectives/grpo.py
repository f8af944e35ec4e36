"""Critic-free online RL on group rollouts: GRPO (Shao et al. 2024), Dr. GRPO (Liu et al.
2025), DAPO's token-level aggregation and clip-higher (Yu et al. 2025), and RLOO (Ahmadian
et al. 2024), one objective over `lmlab.train.rollout`.

Per rollout: one advantage per completion from its group's rewards (`rl.group_advantages`:
"grpo" (r - mean) / (std + eps), "dr_grpo" r - mean, "rloo" r - mean of the others), every
token of the completion sharing it. Per minibatch: the clipped surrogate (clip_low,
clip_high; clip_high > clip_low is clip-higher), plus `beta` times the per-token KL to the
reference (k3 by default, as DeepSeekMath and TRL) as a loss, aggregated by `aggregation`:
"seq_mean_token_mean" is GRPO's original, "token_mean" DAPO's, "seq_mean_token_sum_norm"
Dr. GRPO's. The same computation as TRL's GRPOTrainer loss (tests/test_grpo.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.train.logprobs import masked_logprobs
from lmlab.train.losses import kl_penalty, ppo_policy_loss
from lmlab.train.objectives.online import OnlineObjective, check_choice
from lmlab.train.rl import GROUP_ADVANTAGES, group_advantages


@dataclass(frozen=True)
class GRPOConfig:
    advantage: str = "grpo"  # grpo | dr_grpo | rloo (rl.GROUP_ADVANTAGES)
    beta: float = 0.0  # KL-to-reference coefficient (0: no reference is kept)
    kl_estimator: str = "k3"
    clip_low: float = 0.2
    clip_high: float | None = None  # DAPO's clip-higher: e.g. 0.28
    aggregation: str = "token_mean"  # DAPO; seq_mean_token_mean (GRPO), seq_mean_token_sum_norm (Dr. GRPO)
    eps: float = 1e-4  # grpo's std guard
    ema: bool = False  # EMA of the reference toward the policy (needs beta > 0 to matter)
    eta: float = 0.05

    def __post_init__(self) -> None:
        check_choice(self.advantage, GROUP_ADVANTAGES, "group advantage")
        if self.beta < 0:
            raise LmlabError(f"grpo.beta must be >= 0, got {self.beta}")
        if self.clip_low <= 0 or (self.clip_high is not None and self.clip_high <= 0):
            raise LmlabError("grpo.clip_low (and clip_high) must be > 0")


class GRPO(OnlineObjective):
    """`objective(policy, batch) -> (loss, metrics)`; `group_size` is the rollout's G."""

    name = "grpo"
    reads_rollout_forward = False  # advantages from the scores alone; no critic

    def __init__(self, policy: nn.Module, cfg: GRPOConfig = GRPOConfig(), *, group_size: int,
                 temperature: float = 1.0, max_new_tokens: int = 32, reference: nn.Module | None = None) -> None:
        super().__init__(policy, temperature=temperature, aggregation=cfg.aggregation,
                         max_new_tokens=max_new_tokens, kl_estimator=cfg.kl_estimator,
                         needs_reference=cfg.beta > 0, ema=cfg.ema, eta=cfg.eta, reference=reference)
        if group_size < 1:
            raise LmlabError(f"group_size must be >= 1, got {group_size}")
        self.cfg, self.group_size = cfg, group_size

    def advantages(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        params = {"eps": self.cfg.eps} if self.cfg.advantage == "grpo" else {}
        return {"advantages": group_advantages(batch["score"], self.group_size, self.cfg.advantage, **params)}

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        # The entropy is only reported (no entropy bonus here): no gradient through it.
        lp = masked_logprobs(model, batch["input_ids"], batch["targets"], temperature=self.temperature,
                             entropy=True, entropy_grad=False,
                             keep_hidden="sampler_logp" in batch and self.temperature != 1.0)
        mask = lp.mask
        per_token, clip_fraction, approx_kl = ppo_policy_loss(lp.tokens, self.old_logp(batch, lp),
                                                              batch["advantages"], mask, cfg.clip_low, cfg.clip_high)
        kl = None
        if cfg.beta > 0:
            kl = torch.where(mask, kl_penalty(lp.tokens, batch["ref_logp"], cfg.kl_estimator), 0.0)
            per_token = per_token + cfg.beta * kl
        loss = self.aggregate(per_token, mask)
        with torch.no_grad():
            n = mask.sum().clamp(min=1)
            metrics = {"clip_fraction": clip_fraction, "approx_kl": approx_kl, "entropy": lp.entropy.sum() / n,
                       "advantage_abs": batch["advantages"].abs().mean(), **self.rollout_metrics(batch),
                       **self.sampler_metrics(model, batch, lp)}
            if kl is not None:
                metrics["kl_ref"] = kl.sum() / n
        return loss, metrics
