"""Next-token cross-entropy: the pretraining objective and SFT's (targets masked outside
the answers) in one.

A batch is either a LongTensor (B, T+1) of packed tokens (inputs = [:, :-1], targets =
[:, 1:]) or a dict with `input_ids` (B, T) and `targets` (B, T), where targets equal to
`IGNORE_INDEX` contribute nothing, plus optional `positions` / `attn_mask` passed to the
model (document-packed or padded batches: `lmlab.data.chat.collate_rows` builds them) and
`doc_ids` (padding is PAD_DOC and is not counted as processed tokens).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmlab.data import IGNORE_INDEX, PAD_DOC
from lmlab.model.moe import collect_aux_losses
from lmlab.train.logprobs import masked_logprobs

__all__ = ["IGNORE_INDEX", "LanguageModeling", "split_batch", "with_moe_aux_losses"]


def split_batch(batch: Any) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch[:, :-1], "targets": batch[:, 1:]}
    return batch


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
    """Mean next-token cross-entropy over targets that are not IGNORE_INDEX.

    loss_chunk: project this many positions onto the vocabulary at a time (0: all at once).
    accuracy: also report `token_accuracy` (argmax == target over the counted targets).
    """

    def __init__(self, loss_chunk: int = 0, accuracy: bool = False) -> None:
        self.loss_chunk, self.accuracy = loss_chunk, accuracy

    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = split_batch(batch)
        # A packed token tensor has a target everywhere: no need to select target rows.
        lp = masked_logprobs(model, b["input_ids"], b["targets"], positions=b.get("positions"),
                             attn_mask=b.get("attn_mask"), chunk=self.loss_chunk,
                             select=not isinstance(batch, torch.Tensor), accuracy=self.accuracy)
        count = lp.mask.sum().clamp(min=1)
        loss = -lp.tokens.sum() / count
        # Tensors, not .item(): a host sync here would break torch.compile's graph.
        metrics = {"loss": loss.detach()}
        if lp.correct is not None:
            metrics["token_accuracy"] = lp.correct.sum() / count
        return with_moe_aux_losses(model, loss, metrics), metrics

    def weight(self, batch: Any) -> int:
        """Loss units: target tokens, so accumulated micro-batches average like one batch."""
        return int((split_batch(batch)["targets"] != IGNORE_INDEX).sum())

    def tokens(self, batch: Any) -> int:
        """Tokens processed, padding excluded."""
        b = split_batch(batch)
        if "doc_ids" in b:
            return int((b["doc_ids"] != PAD_DOC).sum())
        return b["input_ids"].numel()
