"""PPO for language models (Ouyang et al. 2022; Xu et al. 2024's best practices), on rollouts
from `lmlab.train.rollout`.

Per rollout (`advantages`): the reward's score lands on each row's last completion token
(never a pad; the row layout is in rollout.py); with `kl_in="reward"` every token also gets
`-kl_coef * KL_t`, KL_t the per-token estimate (k1/k2/k3) between the rollout policy and the
reference; GAE(gamma, lam) over the critic's values gives advantages and returns, and
advantages are whitened over the rollout's real tokens (`whiten_advantages`).

Per minibatch (`__call__`): the clipped policy loss, the clipped value loss (`vf_coef`), an
entropy bonus (`entropy_coef`), with `kl_in="loss"` the KL to the reference as a loss term,
aggregated by `aggregation`. After every optimizer step the reference may follow the policy
by an EMA (`ema`, `eta`).

The critic is a `ValueModel` (the reward model's shape, kind "value"), trained beside the
policy by the one loop (`trainable_modules`), or, with `shared_trunk`, one linear unit on
the policy's own hidden states.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmlab.data import IGNORE_INDEX
from lmlab.errors import LmlabError
from lmlab.model.heads import ValueModel
from lmlab.train.logprobs import masked_logprobs
from lmlab.train.losses import kl_penalty, ppo_policy_loss, value_loss
from lmlab.train.objectives.online import OnlineObjective
from lmlab.train.rl import gae, whiten
from lmlab.train.rollout import last_target_index

KL_PLACES = ("reward", "loss")


@dataclass(frozen=True)
class PPOConfig:
    kl_coef: float = 0.05
    kl_estimator: str = "k1"  # k1 | k2 | k3 (losses.KL_ESTIMATORS)
    kl_in: str = "reward"  # "reward": per-token penalty in the reward; "loss": a loss term
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    clip_high: float | None = None  # None: symmetric
    value_clip: float | None = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    aggregation: str = "token_mean"  # losses.LOSS_AGGREGATIONS
    # Xu et al. (2024)'s best practices, each a switch (large batch: rollout size, see the stage).
    whiten_advantages: bool = True
    ema: bool = True
    eta: float = 0.05  # EMA rate of the reference per optimizer step
    shared_trunk: bool = False  # value head on the policy's trunk instead of a separate critic

    def __post_init__(self) -> None:
        if self.kl_in not in KL_PLACES:
            raise LmlabError(f"ppo.kl_in must be one of {KL_PLACES}, got {self.kl_in!r}")
        if self.kl_coef < 0 or self.vf_coef < 0 or self.entropy_coef < 0:
            raise LmlabError("ppo.kl_coef, vf_coef and entropy_coef must be >= 0")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise LmlabError(f"ppo.gamma and ppo.lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.clip <= 0 or (self.clip_high is not None and self.clip_high <= 0):
            raise LmlabError("ppo.clip (and clip_high) must be > 0")


def check_value_model(value_model: nn.Module, policy: nn.Module) -> None:
    """A critic reads the rollout's token ids: same vocabulary, enough context."""
    if not hasattr(value_model, "values") or not hasattr(value_model, "config"):
        raise LmlabError(f"the value model must be a ValueModel (kind 'value'), got {type(value_model).__name__}; "
                         "build one with ValueModel.from_lm(copy of the policy) or load a value checkpoint")
    theirs, ours = value_model.config, policy.config
    if theirs.vocab_size != ours.vocab_size or theirs.max_seq_len < ours.max_seq_len:
        raise LmlabError(f"the value model (vocabulary {theirs.vocab_size}, context {theirs.max_seq_len}) does not "
                         f"match the policy (vocabulary {ours.vocab_size}, context {ours.max_seq_len}): initialise "
                         "the critic from the policy's SFT model or from a reward model trained on it")


class PPO(OnlineObjective):
    """`objective(policy, batch) -> (loss, metrics)` on rollout minibatches."""

    name = "ppo"

    def __init__(self, policy: nn.Module, cfg: PPOConfig = PPOConfig(), *, value_model: nn.Module | None = None,
                 temperature: float = 1.0, max_new_tokens: int = 32, reference: nn.Module | None = None) -> None:
        super().__init__(policy, temperature=temperature, aggregation=cfg.aggregation,
                         max_new_tokens=max_new_tokens, kl_estimator=cfg.kl_estimator,
                         needs_reference=cfg.kl_coef > 0, ema=cfg.ema, eta=cfg.eta, reference=reference)
        self.cfg = cfg
        if cfg.shared_trunk:
            if value_model is not None:
                raise LmlabError("ppo.shared_trunk puts the value head on the policy: give no separate value model")
            param = policy.embed.weight
            self.value_head = nn.Linear(policy.config.d_model, 1, bias=False, device=param.device, dtype=param.dtype)
            nn.init.zeros_(self.value_head.weight)
            self.value_model = None
        else:
            if value_model is None:
                import copy

                value_model = ValueModel.from_lm(copy.deepcopy(policy))
            check_value_model(value_model, policy)
            self.value_model, self.value_head = value_model, None

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"value_head": self.value_head} if self.cfg.shared_trunk else {"value": self.value_model}

    # ---------------------------------------------------------------- rollout side
    def values(self, batch: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        if self.cfg.shared_trunk:
            return self.value_head(hidden).squeeze(-1).float()
        return self.value_model.values(batch["input_ids"])

    def token_rewards(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(rewards (B, T), per-token KL (B, T)): the score on the last completion token,
        and -kl_coef * KL on every completion token when the KL is in the reward."""
        mask = batch["targets"] != IGNORE_INDEX
        rewards = torch.zeros(mask.shape)
        kl = torch.zeros(mask.shape)
        if "ref_logp" in batch:
            kl = torch.where(mask, kl_penalty(batch["old_logp"], batch["ref_logp"], self.cfg.kl_estimator), 0.0)
            if self.cfg.kl_in == "reward":
                rewards = rewards - self.cfg.kl_coef * kl
        last = last_target_index(batch["targets"])
        rewards[torch.arange(mask.shape[0]), last] += batch["score"].float()
        return rewards, kl

    def advantages(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = batch["targets"] != IGNORE_INDEX
        rewards, _ = self.token_rewards(batch)
        adv, returns = gae(rewards, batch["old_values"], mask, self.cfg.gamma, self.cfg.lam)
        if self.cfg.whiten_advantages:
            adv = whiten(adv, mask)
        return {"advantages": adv, "returns": returns}

    # ---------------------------------------------------------------- update side
    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        # Without an entropy bonus the entropy is only reported: no gradient through it.
        lp = masked_logprobs(model, batch["input_ids"], batch["targets"], temperature=self.temperature,
                             entropy=True, entropy_grad=cfg.entropy_coef != 0, keep_hidden=cfg.shared_trunk)
        mask = lp.mask
        pg, clip_fraction, approx_kl = ppo_policy_loss(lp.tokens, batch["old_logp"], batch["advantages"], mask,
                                                       cfg.clip, cfg.clip_high)
        values = (self.value_head(lp.hidden).squeeze(-1).float() if cfg.shared_trunk
                  else self.value_model.values(batch["input_ids"]))
        vl = value_loss(values, batch["old_values"], batch["returns"], mask, cfg.value_clip)
        per_token = pg + cfg.vf_coef * vl - cfg.entropy_coef * lp.entropy
        kl = None
        if "ref_logp" in batch:
            kl = torch.where(mask, kl_penalty(lp.tokens, batch["ref_logp"], cfg.kl_estimator), 0.0)
            if cfg.kl_in == "loss":
                per_token = per_token + cfg.kl_coef * kl
        loss = self.aggregate(per_token, mask)
        with torch.no_grad():
            n = mask.sum().clamp(min=1)
            ratio = torch.where(mask, torch.exp(lp.tokens - batch["old_logp"]), 0.0)
            metrics = {"policy_loss": self.aggregate(pg, mask), "value_loss": self.aggregate(vl, mask),
                       "entropy": lp.entropy.sum() / n, "clip_fraction": clip_fraction, "approx_kl": approx_kl,
                       "ratio_mean": ratio.sum() / n,
                       "ratio_max_dev": torch.where(mask, (ratio - 1).abs(), 0.0).max(),
                       "value_mean": torch.where(mask, values, 0.0).sum() / n,
                       **self.rollout_metrics(batch)}
            if kl is not None:
                metrics["kl_ref"] = kl.sum() / n
        return loss, metrics
