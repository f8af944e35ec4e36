"""Supervised fine-tuning: next-token cross-entropy on the assistant's tokens only, over
packed rows whose document ids keep conversations from attending to one another."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.data.chat import IGNORE, PAD_DOC
from lmlab.errors import LmlabError
from lmlab.model.masks import document_causal_mask, document_positions


def packed_logits(model, input_ids: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """Logits of packed rows: attention stays inside a document, positions restart at 0."""
    return model(input_ids, positions=document_positions(doc_ids), attn_mask=document_causal_mask(doc_ids))


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the tokens whose target is not IGNORE; and their count."""
    n = int((targets != IGNORE).sum())
    if n == 0:
        raise LmlabError("a batch has no trainable (assistant) token; check the chat data's answers")
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum")
    return loss / n, n


class SFTObjective:
    """`objective(model, batch) -> (loss, metrics)` for batches of `lmlab.data.chat` rows
    (`input_ids`, `targets`, `doc_ids`)."""

    name = "sft"

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        """Loss units: answer tokens, so accumulated micro-batches average like one batch."""
        return int((batch["targets"] != IGNORE).sum())

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens processed, padding excluded."""
        return int((batch["doc_ids"] != PAD_DOC).sum())

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        input_ids = batch["input_ids"].to(device)
        targets = batch["targets"].to(device)
        logits = packed_logits(model, input_ids, batch["doc_ids"].to(device))
        loss, n = masked_token_loss(logits, targets)
        with torch.no_grad():
            trained = targets != IGNORE
            accuracy = (logits.argmax(-1)[trained] == targets[trained]).float().mean().item()
        return loss, {"loss": loss.item(), "answer_tokens": float(n), "token_accuracy": accuracy}
