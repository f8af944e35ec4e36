"""Perplexity of a causal LM over a long token stream, in non-overlapping windows."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError


@torch.no_grad()
def perplexity(model, token_ids: Sequence[int] | torch.Tensor, window: int, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over `token_ids` cut into windows of `window` tokens (the
    tail shorter than a window is dropped). Each window starts from an empty context, so
    its first token is not scored: window - 1 predictions per window."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if window < 2:
        raise LmlabError(f"perplexity window must be at least 2 tokens, got {window}")
    n = ids.numel() // window
    if n == 0:
        raise LmlabError(f"{ids.numel()} tokens do not fill one window of {window}; pass more text or a smaller window")
    windows = ids[: n * window].view(n, window)
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        batch = windows[start:start + batch_size].to(device)
        logits = model(batch[:, :-1]).float()
        nll = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total, count = total + float(nll), count + batch[:, 1:].numel()
    return math.exp(total / count)
