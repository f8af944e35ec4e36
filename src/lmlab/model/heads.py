"""Scalar heads on the transformer: the reward model.

A reward model is the decoder trunk with one linear unit read at the *last real token* of
each row: the last position whose attention mask is 1. Reading it from the mask (never
from token ids, never as "first pad - 1") keeps it right under right padding, left
padding, and a tokenizer whose pad token is also its EOS.

The trunk has no LM head: a reward checkpoint holds `transformer.*` (embedding, blocks,
final norm) and `score.weight`, exactly what a Hugging Face `*ForSequenceClassification`
holds, so the two convert one to one and WARM averages nothing unused.
"""
from __future__ import annotations

import torch
from torch import nn

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.model.transformer import Transformer


def last_real_index(attn_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) validity (1/True = real token) -> (B,) index of each row's last real token."""
    mask = attn_mask.bool()
    slots = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(mask, slots, torch.full_like(slots, -1)).max(dim=-1).values
    if bool((last < 0).any()):
        raise LmlabError("a row of the batch has no real token (its attention mask is all 0); "
                         "drop empty sequences before scoring them")
    return last


def real_positions(attn_mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions counting real tokens only: a left-padded row starts at 0 where its
    first real token is, so a sequence has the same positions alone and in any batch."""
    return (attn_mask.long().cumsum(-1) - 1).clamp(min=0)


def _no_lm_head(*args, **kwargs):
    raise LmlabError("a reward model's trunk has no LM head; score with RewardModel(...) or load the "
                     "SFT model it started from to generate text")


class RewardModel(nn.Module):
    """`rm(input_ids, attn_mask) -> (B,)` float32 scores, one per row."""

    kind = "reward"

    def __init__(self, cfg: ModelConfig, transformer: Transformer | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = transformer if transformer is not None else Transformer(cfg)
        # The trunk's vocabulary projection is never used by a scalar head; dropping it
        # keeps the checkpoint equal to HF's sequence-classification layout.
        self.transformer.lm_head = None
        self.transformer.logits = _no_lm_head
        param = self.transformer.embed.weight
        self.score = nn.Linear(cfg.d_model, 1, bias=False, device=param.device, dtype=param.dtype)
        if param.device.type != "meta":
            nn.init.zeros_(self.score.weight)

    @classmethod
    def from_lm(cls, transformer: Transformer, head_init_std: float = 0.0) -> "RewardModel":
        """Adopt `transformer` (e.g. the SFT model; its LM head is removed in place) as the
        trunk, with a new head: zero (every score 0, so training starts at loss ln 2) or
        normal(0, head_init_std)."""
        rm = cls(transformer.config, transformer)
        if head_init_std > 0:
            with torch.no_grad():
                rm.score.weight.normal_(0.0, head_init_std)
        return rm

    def features(self, input_ids: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, d_model) final-normed hidden state at each row's last real token."""
        if attn_mask is None:
            hidden = self.transformer.hidden_states(input_ids)
            return hidden[:, -1]
        attn_mask = attn_mask.to(input_ids.device).bool()
        last = last_real_index(attn_mask)
        padded = not bool(attn_mask.all())
        # Without padding the fused causal path is exact; with it, the key mask hides pads
        # (needed for left padding; harmless for right padding, where causality already does).
        hidden = self.transformer.hidden_states(
            input_ids, positions=real_positions(attn_mask) if padded else None,
            attn_mask=attn_mask if padded else None)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(self, input_ids: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.score(self.features(input_ids, attn_mask)).squeeze(-1).float()


class ValueModel(RewardModel):
    """A PPO critic: the reward model's shape (trunk + one linear unit), read at every
    token instead of the last one. `values(ids)` is V(s_t) for each prefix."""

    kind = "value"

    def values(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) float32: the value of the state after reading input_ids[:, :t+1]."""
        hidden = self.transformer.hidden_states(input_ids, positions=positions, attn_mask=attn_mask)
        return self.score(hidden).squeeze(-1).float()

    @classmethod
    def from_reward_model(cls, rm: RewardModel) -> "ValueModel":
        """Adopt a reward model's trunk and head (a common critic initialisation)."""
        vm = cls(rm.config, rm.transformer)
        vm.score = rm.score
        return vm
