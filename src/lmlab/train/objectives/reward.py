"""Bradley–Terry reward modelling: P(chosen > rejected) = sigmoid(r_chosen - r_rejected).

    loss = mean(-log sigmoid(r_c - r_r - margin)) + center_weight * mean((r_c + r_r)^2)

The margin (per pair, optional) asks the chosen answer to win by at least that much
(Llama 2's graded preferences); the centring term pulls scores toward mean zero, since
Bradley–Terry only fixes differences. Batches come from `lmlab.data.preference`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lmlab.train.objectives.lm import with_moe_aux_losses


def _bt_loss(diff: torch.Tensor) -> torch.Tensor:
    # Kept private here: a shared pairwise loss may live in train/losses.py later.
    return -F.logsigmoid(diff).mean()


def _pad_right(ids: torch.Tensor, mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Widen a side with masked right padding: exact for right- and left-padded rows alike,
    since scores are read at the last real token and positions count real tokens."""
    extra = width - ids.shape[1]
    if extra == 0:
        return ids, mask
    return F.pad(ids, (0, extra)), F.pad(mask, (0, extra))


class BradleyTerry:
    """`objective(reward_model, batch) -> (loss, metrics)`; chosen and rejected run as one
    concatenated forward (one pass over the trunk, the same padding for both sides)."""

    name = "reward"

    def __init__(self, margin_key: str = "margin", center_weight: float = 0.0) -> None:
        if center_weight < 0:
            raise ValueError(f"center_weight must be >= 0, got {center_weight}")
        self.margin_key, self.center_weight = margin_key, center_weight

    def scores(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_chosen, r_rejected), each (B,) float32."""
        width = max(batch["chosen_ids"].shape[1], batch["rejected_ids"].shape[1])
        c_ids, c_mask = _pad_right(batch["chosen_ids"], batch["chosen_mask"], width)
        r_ids, r_mask = _pad_right(batch["rejected_ids"], batch["rejected_mask"], width)
        scores = model(torch.cat([c_ids, r_ids]), torch.cat([c_mask, r_mask]))
        n = c_ids.shape[0]
        return scores[:n], scores[n:]

    def __call__(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r_c, r_r = self.scores(model, batch)
        diff = r_c - r_r
        margin = batch.get(self.margin_key)
        bt = _bt_loss(diff if margin is None else diff - margin.to(diff))
        loss = bt
        if self.center_weight:
            loss = loss + self.center_weight * ((r_c + r_r) ** 2).mean()
        with torch.no_grad():
            both = torch.cat([r_c, r_r])
            # A tie counts half: an untrained (zero-head) model scores exactly 0.5.
            accuracy = (diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()
            # Tensors, not floats: the loop converts once per step.
            metrics = {"loss": bt.detach(), "accuracy": accuracy, "margin": diff.mean(),
                       "reward_mean": both.mean(), "reward_std": both.std(correction=0)}
        # Sparse-expert trunks: the router's balancing losses, as for every objective.
        return with_moe_aux_losses(model, loss, metrics), metrics

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        """Loss units: preference pairs."""
        return int(batch["chosen_ids"].shape[0])

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Real tokens of both sides (padding excluded)."""
        return int(batch["chosen_mask"].sum()) + int(batch["rejected_mask"].sum())
