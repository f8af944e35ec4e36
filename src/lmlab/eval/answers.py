"""Teacher-forced answer exact match on chat rows: the share of conversations whose every
answer token is the model's argmax given the gold prefix. Along the gold prefix greedy
decoding picks exactly those argmaxes, so this equals greedy-generation exact match (end
token included) without running generation."""
from __future__ import annotations

import torch
from torch import nn

from lmlab.data import IGNORE_INDEX


def answer_exact_match(logits: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """Per conversation (row, document) with answers: 1.0 if every answer token is the
    argmax, else 0.0."""
    trained = targets != IGNORE_INDEX
    wrong = trained & (logits.argmax(-1) != targets)
    scores = []
    for row in range(targets.shape[0]):
        for doc in doc_ids[row][trained[row]].unique():
            in_doc = doc_ids[row] == doc
            scores.append(0.0 if wrong[row][in_doc].any() else 1.0)
    return torch.tensor(scores)


@torch.no_grad()
def exact_match(model: nn.Module, batches, precision=None) -> float:
    """Answer exact match over batches of collated chat rows (`lmlab.data.chat.collate_rows`),
    under `precision` (a `lmlab.precision.Resolved`; the training's, so the figure reports
    the model as it was trained)."""
    import contextlib

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    with precision.autocast() if precision is not None else contextlib.nullcontext():
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            logits = model(b["input_ids"], positions=b["positions"], attn_mask=b["attn_mask"])
            scores.append(answer_exact_match(logits, b["targets"], b["doc_ids"]))
    model.train(was_training)
    return float(torch.cat(scores).mean()) if scores else float("nan")
