"""The one masked log-probability primitive: log p(target token) at every position whose
target is not IGNORE_INDEX, per token and summed per sequence.

Language modelling and SFT (the mean of −log p over target tokens), reward models, DPO
(summed completion log-probs) and PPO (per-token log-probs) all read it. Only positions
with a target are projected onto the vocabulary, and with `chunk` > 0 the projection runs
`chunk` rows at a time under activation checkpointing, so the full (N, vocab) float32
logits never exist at once.

Online RL reads two more things off the same projection: log-probs at a sampling
`temperature` (logits / T, the distribution the rollout was drawn from) and the policy's
entropy per token; and a shared-trunk value head reads the hidden states (`keep_hidden`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.data import IGNORE_INDEX
from lmlab.train.losses import entropy_from_logits, entropy_from_logprobs


@dataclass
class Logprobs:
    tokens: torch.Tensor  # (B, T) float32 log p(target); 0 where there is no target
    mask: torch.Tensor  # (B, T) bool: the positions with a target
    correct: torch.Tensor | None = None  # (B, T) bool: argmax == target (when asked)
    entropy: torch.Tensor | None = None  # (B, T) float32 entropy in nats; 0 where no target (when asked)
    hidden: torch.Tensor | None = None  # (B, T, d) final-normed hidden states (when asked)

    @property
    def sums(self) -> torch.Tensor:
        """(B,) summed log-probs of each sequence's targets."""
        return self.tokens.sum(-1)

    @property
    def counts(self) -> torch.Tensor:
        """(B,) number of targets per sequence."""
        return self.mask.sum(-1)


def row_logprobs(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 0,
                 accuracy: bool = False, temperature: float = 1.0, entropy: bool = False,
                 entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(N,) log p(targets) for hidden rows (N, d) under `model.logits` / temperature, 0 at
    IGNORE_INDEX; with `accuracy`, (N,) whether each target is the argmax; with `entropy`,
    (N,) the entropy of each row's distribution (at the same temperature). `entropy_grad=False`
    says the entropy is only reported: it is then read off the log-softmax of the log-probs
    without gradient (fewer vocabulary-sized temporaries; equal to float rounding)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")

    def piece(h: torch.Tensor, t: torch.Tensor):
        logits = model.logits(h).float()
        if temperature != 1.0:
            logits = logits / temperature
        ent = None
        if entropy and not entropy_grad:
            # log_softmax + gather is what cross_entropy computes (same values and gradient,
            # bit for bit), with the log-softmax kept for the entropy.
            all_logp = logits.log_softmax(-1)
            ignored = t == IGNORE_INDEX
            picked = all_logp.gather(-1, t.masked_fill(ignored, 0)[:, None]).squeeze(-1)
            logp = torch.where(ignored, 0.0, picked)
            ent = entropy_from_logprobs(all_logp.detach())
        else:
            logp = -F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="none")
            if entropy:
                ent = entropy_from_logits(logits)
        correct = (logits.detach().argmax(-1) == t) if accuracy else None
        return logp, correct, ent

    if chunk <= 0 or hidden.shape[0] <= chunk:
        return piece(hidden, targets)
    from torch.utils.checkpoint import checkpoint

    parts = [checkpoint(piece, hidden[s:s + chunk], targets[s:s + chunk], use_reentrant=False)
             for s in range(0, hidden.shape[0], chunk)]
    logp = torch.cat([p[0] for p in parts])
    return (logp, torch.cat([p[1] for p in parts]) if accuracy else None,
            torch.cat([p[2] for p in parts]) if entropy else None)


def masked_logprobs(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, *,
                    positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                    chunk: int = 0, select: bool = True, accuracy: bool = False,
                    temperature: float = 1.0, entropy: bool = False, entropy_grad: bool = True,
                    keep_hidden: bool = False) -> Logprobs:
    """Log-probs of `targets` (B, T) after reading `input_ids` (B, T).

    select: project only the rows with a target (prompt and padding rows never reach the
        vocabulary). Turn it off where every position has one (packed pretraining), which
        saves the gather.
    temperature: log-probs of softmax(logits / temperature), what a sampler at that
        temperature drew from. entropy: also the per-token entropy (`entropy_grad=False`:
        only reported, no gradient through it; cheaper). keep_hidden: also
        return the hidden states (a shared-trunk value head reads them).
    """
    hidden = model.hidden_states(input_ids, positions=positions, attn_mask=attn_mask)
    mask = targets != IGNORE_INDEX
    kept = hidden if keep_hidden else None
    if not select:
        logp, correct, ent = row_logprobs(model, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1),
                                          chunk, accuracy, temperature, entropy, entropy_grad)
        return Logprobs(logp.view_as(targets), mask,
                        None if correct is None else correct.view_as(targets) & mask,
                        None if ent is None else torch.where(mask, ent.view_as(targets), 0.0), kept)
    logp_rows, correct_rows, ent_rows = row_logprobs(model, hidden[mask], targets[mask], chunk, accuracy,
                                                     temperature, entropy, entropy_grad)
    tokens = torch.zeros(targets.shape, dtype=logp_rows.dtype, device=targets.device)
    tokens = tokens.masked_scatter(mask, logp_rows)
    correct = ent = None
    if correct_rows is not None:
        correct = torch.zeros_like(mask).masked_scatter(mask, correct_rows)
    if ent_rows is not None:
        ent = torch.zeros(targets.shape, dtype=ent_rows.dtype, device=targets.device).masked_scatter(mask, ent_rows)
    return Logprobs(tokens, mask, correct, ent, kept)
