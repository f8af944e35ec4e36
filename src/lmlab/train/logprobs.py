"""The one masked log-probability primitive: log p(target token) at every position whose
target is not IGNORE_INDEX, per token and summed per sequence.

Language modelling and SFT (the mean of −log p over target tokens), reward models, DPO
(summed completion log-probs) and PPO (per-token log-probs) all read it. Only positions
with a target are projected onto the vocabulary, and with `chunk` > 0 the projection runs
`chunk` rows at a time under activation checkpointing, so the full (N, vocab) float32
logits never exist at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.data import IGNORE_INDEX


@dataclass
class Logprobs:
    tokens: torch.Tensor  # (B, T) float32 log p(target); 0 where there is no target
    mask: torch.Tensor  # (B, T) bool: the positions with a target
    correct: torch.Tensor | None = None  # (B, T) bool: argmax == target (when asked)

    @property
    def sums(self) -> torch.Tensor:
        """(B,) summed log-probs of each sequence's targets."""
        return self.tokens.sum(-1)

    @property
    def counts(self) -> torch.Tensor:
        """(B,) number of targets per sequence."""
        return self.mask.sum(-1)


def row_logprobs(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 0,
                 accuracy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N,) log p(targets) for hidden rows (N, d) under `model.logits`, 0 at IGNORE_INDEX;
    and, with `accuracy`, (N,) whether each target is the argmax."""
    def piece(h: torch.Tensor, t: torch.Tensor):
        logits = model.logits(h).float()
        logp = -F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="none")
        if not accuracy:
            return logp, None
        return logp, (logits.detach().argmax(-1) == t)

    if chunk <= 0 or hidden.shape[0] <= chunk:
        return piece(hidden, targets)
    from torch.utils.checkpoint import checkpoint

    parts = [checkpoint(piece, hidden[s:s + chunk], targets[s:s + chunk], use_reentrant=False)
             for s in range(0, hidden.shape[0], chunk)]
    logp = torch.cat([p[0] for p in parts])
    return logp, (torch.cat([p[1] for p in parts]) if accuracy else None)


def masked_logprobs(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, *,
                    positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                    chunk: int = 0, select: bool = True, accuracy: bool = False) -> Logprobs:
    """Log-probs of `targets` (B, T) after reading `input_ids` (B, T).

    select: project only the rows with a target (prompt and padding rows never reach the
        vocabulary). Turn it off where every position has one (packed pretraining), which
        saves the gather.
    """
    hidden = model.hidden_states(input_ids, positions=positions, attn_mask=attn_mask)
    mask = targets != IGNORE_INDEX
    if not select:
        logp, correct = row_logprobs(model, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1),
                                     chunk, accuracy)
        return Logprobs(logp.view_as(targets), mask,
                        None if correct is None else correct.view_as(targets) & mask)
    logp_rows, correct_rows = row_logprobs(model, hidden[mask], targets[mask], chunk, accuracy)
    tokens = torch.zeros(targets.shape, dtype=logp_rows.dtype, device=targets.device)
    tokens = tokens.masked_scatter(mask, logp_rows)
    correct = None
    if correct_rows is not None:
        correct = torch.zeros_like(mask).masked_scatter(mask, correct_rows)
    return Logprobs(tokens, mask, correct)
