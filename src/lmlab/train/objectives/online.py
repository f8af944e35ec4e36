"""What PPO, GRPO and RLOO share: a policy trained on rollouts (`lmlab.train.rollout`)
against a frozen reference, with a KL to it, an optional EMA update of it, and the loss
aggregation switch.

A rollout batch holds `input_ids`, `targets` (completion tokens, IGNORE_INDEX elsewhere),
`score` (B,), `old_logp`, optionally `ref_logp` and `old_values` (B, T), the advantage
fields the objective's `advantages` filled, and `stat_*` (B,) rollout statistics that are
logged as they are. An on-policy rollout (read once, in one micro-batch) may come without
`old_logp` and with `sampler_logp` instead: the update's own log-probs, detached, are then
the old ones (`old_logp`), and `sampler_metrics` reports the sampler gap from them.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lmlab.data import IGNORE_INDEX
from lmlab.errors import LmlabError
from lmlab.train.logprobs import Logprobs, row_logprobs
from lmlab.train.losses import LOSS_AGGREGATIONS, KL_ESTIMATORS, aggregate_loss
from lmlab.train.rl import ema_update

REFERENCE_PREFIX = "reference."


def check_choice(value: str, table, what: str) -> None:
    if value not in table:
        raise LmlabError(f"unknown {what} {value!r}; choose one of {sorted(table)}")


class OnlineObjective:
    """Base of the online objectives. `reference`: a frozen copy of the policy (made here
    unless given), or None when nothing reads it (no KL, no EMA)."""

    # Whether `advantages` or `values` read the rollout's own policy forward (old log-probs,
    # a critic's values); if not, an on-policy rollout skips that forward (lmlab.train.rollout).
    reads_rollout_forward = True

    def __init__(self, policy: nn.Module, *, temperature: float, aggregation: str, max_new_tokens: int,
                 kl_estimator: str, needs_reference: bool, ema: bool = False, eta: float = 0.0,
                 reference: nn.Module | None = None) -> None:
        check_choice(aggregation, LOSS_AGGREGATIONS, "loss aggregation")
        check_choice(kl_estimator, KL_ESTIMATORS, "KL estimator")
        if not temperature > 0:
            raise LmlabError(f"temperature must be > 0, got {temperature}")
        if ema and not 0.0 <= eta <= 1.0:
            raise LmlabError(f"ema eta must be in [0, 1] (0 keeps the reference, 1 copies the policy), got {eta}")
        self.policy, self.temperature, self.aggregation = policy, temperature, aggregation
        self.max_new_tokens, self.kl_estimator, self.ema, self.eta = max_new_tokens, kl_estimator, ema, eta
        if needs_reference or ema:
            if reference is None:
                reference = copy.deepcopy(policy)
            reference.requires_grad_(False).eval()
            if _shapes(reference) != _shapes(policy):
                raise LmlabError("the reference model is not the policy's architecture; use a copy of the SFT model")
        else:
            reference = None
        self.reference = reference

    # ---------------------------------------------------------------- loop hooks
    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"reference": self.reference} if self.reference is not None else {}

    def after_step(self, step: int) -> None:
        """EMA of the reference toward the policy (Xu et al. 2024), once per optimizer step."""
        if self.ema and self.reference is not None:
            ema_update(self.reference.parameters(), self.policy.parameters(), self.eta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.reference is None:
            return {}
        return {REFERENCE_PREFIX + k: v for k, v in self.reference.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.reference is None:
            return
        own = {k[len(REFERENCE_PREFIX):]: v for k, v in state.items() if k.startswith(REFERENCE_PREFIX)}
        if not own:
            raise LmlabError("the checkpoint holds no reference model state; resume with the settings the run "
                             "was started with (KL / EMA on)")
        self.reference.load_state_dict(own)

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        """Loss units: completion tokens under token_mean, sequences otherwise, so that
        accumulated micro-batches aggregate like one batch."""
        if self.aggregation == "token_mean":
            return int((batch["targets"] != IGNORE_INDEX).sum())
        return int(batch["targets"].shape[0])

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["targets"] != IGNORE_INDEX).sum())

    # ---------------------------------------------------------------- shared arithmetic
    def values(self, batch: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor | None:
        return None  # critic-free by default

    def aggregate(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        params = {"max_len": self.max_new_tokens} if self.aggregation == "seq_mean_token_sum_norm" else {}
        return aggregate_loss(per_token, mask, self.aggregation, **params)

    @staticmethod
    def old_logp(batch: dict[str, Any], lp: Logprobs) -> torch.Tensor:
        """The rollout's old log-probs, or, for an on-policy rollout that skipped its scoring
        forward, the update's own (detached): the same weights produced both."""
        old = batch.get("old_logp")
        return lp.tokens.detach() if old is None else old

    def sampler_metrics(self, model: nn.Module, batch: dict[str, Any], lp: Logprobs) -> dict[str, torch.Tensor]:
        """`max_dlogp` of an on-policy rollout: the largest |log p| gap between the sampler
        and this forward (temperature 1; at another temperature `lp` needs `hidden`)."""
        if "sampler_logp" not in batch:
            return {}
        with torch.no_grad():
            unit = lp.tokens
            if self.temperature != 1.0:
                rows, _, _ = row_logprobs(model, lp.hidden[lp.mask], batch["targets"][lp.mask])
                unit = torch.zeros_like(lp.tokens).masked_scatter(lp.mask, rows)
            gap = torch.where(lp.mask, unit.float() - batch["sampler_logp"].float(), 0.0)
            return {"max_dlogp": gap.abs().max()}

    @staticmethod
    def rollout_metrics(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {k[len("stat_"):]: v.float().mean() for k, v in batch.items() if k.startswith("stat_")}


def _shapes(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]
