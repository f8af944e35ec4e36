"""Next-token cross-entropy: the pretraining objective, and SFT's (mask prompt targets).

A batch is either a LongTensor (B, T+1) of packed tokens (inputs = [:, :-1], targets =
[:, 1:]) or a dict with `input_ids` (B, T), `targets` (B, T) where targets equal to
`IGNORE_INDEX` contribute nothing, and optional `positions` / `attn_mask` passed to the model
(document-packed or padded batches).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.model.moe import collect_aux_losses

IGNORE_INDEX = -100


def split_batch(batch: Any) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch[:, :-1], "targets": batch[:, 1:]}
    return batch


def chunked_cross_entropy(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                          chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of counted tokens) over `hidden` (N, d) rows.

    With `chunk` > 0 the vocabulary projection is done `chunk` rows at a time and each
    chunk is checkpointed, so the full (N, vocab) float32 logits never exist at once; the
    result is the same sum.
    """
    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = model.logits(h).float()
        return F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum")

    count = (targets != IGNORE_INDEX).sum()
    if chunk <= 0 or hidden.shape[0] <= chunk:
        return piece(hidden, targets), count
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(piece, hidden[start:start + chunk], targets[start:start + chunk],
                                   use_reentrant=False)
    return total, count


def with_moe_aux_losses(model: nn.Module, loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
    """For sparse experts, `loss` plus the router's balancing and z losses of the last
    forward with the config's weights (their values go into `metrics`); else `loss`."""
    aux = collect_aux_losses(model)
    if not aux:
        return loss
    cfg = model.config
    metrics.update({name: value.detach() for name, value in aux.items()})
    return loss + cfg.moe_aux_loss_weight * aux["moe_aux_loss"] + cfg.moe_z_loss_weight * aux["moe_z_loss"]


class LanguageModeling:
    """Mean next-token cross-entropy over targets that are not IGNORE_INDEX."""

    def __init__(self, loss_chunk: int = 0) -> None:
        self.loss_chunk = loss_chunk

    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = split_batch(batch)
        hidden = model.hidden_states(b["input_ids"], positions=b.get("positions"),
                                     attn_mask=b.get("attn_mask"))
        targets = b["targets"].reshape(-1)
        total, count = chunked_cross_entropy(model, hidden.reshape(-1, hidden.shape[-1]),
                                             targets, self.loss_chunk)
        loss = total / count.clamp(min=1)
        # Tensors, not .item(): a host sync here would break torch.compile's graph.
        metrics = {"loss": loss.detach()}
        return with_moe_aux_losses(model, loss, metrics), metrics

    def weight(self, batch: Any) -> int:
        return int((split_batch(batch)["targets"] != IGNORE_INDEX).sum())

    def tokens(self, batch: Any) -> int:
        return split_batch(batch)["input_ids"].numel()
