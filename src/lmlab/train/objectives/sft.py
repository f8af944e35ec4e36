"""Supervised fine-tuning: next-token cross-entropy on the assistant's tokens only, over
packed rows whose document ids keep conversations from attending to one another."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.data.chat import IGNORE, PAD_DOC
from lmlab.errors import LmlabError
from lmlab.model.masks import document_causal_mask, document_positions
from lmlab.train.objectives.lm import with_moe_aux_losses


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
            accuracy = (logits.argmax(-1)[trained] == targets[trained]).float().mean()
        # Tensors, not floats: the loop converts once per step (no extra host syncs here).
        metrics = {"loss": loss.detach(), "answer_tokens": float(n), "token_accuracy": accuracy}
        return with_moe_aux_losses(model, loss, metrics), metrics


def answer_exact_match(logits: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """Per conversation (row, document) with answers: 1.0 if every answer token is the
    argmax under teacher forcing, else 0.0. Along the gold prefix, greedy decoding picks
    exactly those argmaxes, so this equals greedy-generation exact match (end token
    included) without running generation."""
    trained = targets != IGNORE
    wrong = trained & (logits.argmax(-1) != targets)
    scores = []
    for row in range(targets.shape[0]):
        for doc in doc_ids[row][trained[row]].unique():
            in_doc = doc_ids[row] == doc
            scores.append(0.0 if wrong[row][in_doc].any() else 1.0)
    return torch.tensor(scores)
