"""One scoring interface for every reward: a trained RM, a WARM RM, an ensemble of RMs,
and a world's programmatic gold reward. Best-of-N, rejection sampling, PPO, iterative DPO
and the server take any `Reward`.

    reward.score(prompts, completions) -> (N,) float32 tensor on the CPU
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import torch

from lmlab.data.preference import PairEncoder, fit_to_context, pad_id_of, pad_rows
from lmlab.errors import LmlabError

ENSEMBLE_MODES = ("mean", "mean_minus_std")
GOLD_KINDS = ("dense", "sparse")


@runtime_checkable
class Reward(Protocol):
    # Whether an empty completion can be scored: a learned reward model cannot render an
    # empty assistant turn (its template refuses one), a programmatic reward can.
    scores_empty: bool

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor: ...


def _check_lengths(prompts: Sequence, completions: Sequence) -> None:
    if len(prompts) != len(completions):
        raise LmlabError(f"got {len(prompts)} prompts and {len(completions)} completions; pass one prompt per "
                         "completion (repeat a prompt for each of its samples)")


class ModelReward:
    """A reward model's scores, batched, with the template it was trained with.

    Rows are scored in batches of `batch_size`, longest first so little padding is run,
    and returned in input order."""

    scores_empty = False

    def __init__(self, rm, tokenizer, batch_size: int = 16, template: str = "lmlab",
                 truncate: bool = False) -> None:
        if batch_size <= 0:
            raise LmlabError(f"batch_size must be positive, got {batch_size}")
        self.rm, self.tokenizer, self.batch_size, self.truncate = rm, tokenizer, batch_size, truncate
        self.encoder = PairEncoder(tokenizer, template)
        self.pad_id = pad_id_of(tokenizer)

    @classmethod
    def from_dir(cls, rm_dir: str | Path, batch_size: int = 16, device: str = "cpu",
                 dtype: torch.dtype | None = None, template: str | None = None) -> "ModelReward":
        """Load a reward checkpoint and its tokenizer; the template defaults to the one
        recorded at training time."""
        from lmlab.checkpoint import read_config_json
        from lmlab.rewards.io import load_reward_model
        from lmlab.tokenizer import Tokenizer

        rm = load_reward_model(rm_dir, device=device, dtype=dtype)
        meta = read_config_json(rm_dir)
        spec = template or (meta.get("reward") or {}).get("template", "lmlab")
        return cls(rm, Tokenizer.load(rm_dir), batch_size, spec)

    def encode(self, prompt, completion: str, source: str = "<memory>") -> list[int]:
        ids, plen = self.encoder.encode(prompt, completion, source)
        return fit_to_context(ids, plen, self.rm.config.max_seq_len, self.truncate, source)[0]

    @torch.no_grad()
    def score_ids(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        was_training = self.rm.training
        self.rm.eval()
        device = next(self.rm.parameters()).device
        out = torch.empty(len(rows), dtype=torch.float32)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        try:
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                ids, mask = pad_rows([rows[i] for i in idx], self.pad_id)
                out[idx] = self.rm(ids.to(device), mask.to(device)).float().cpu()
        finally:
            self.rm.train(was_training)
        return out

    def score(self, prompts, completions: list[str]) -> torch.Tensor:
        _check_lengths(prompts, completions)
        return self.score_ids([self.encode(p, c, f"item {i}") for i, (p, c) in enumerate(zip(prompts, completions))])


class EnsembleReward:
    """ENS: prediction ensembling of M rewards. "mean" averages their scores;
    "mean_minus_std" subtracts k times their spread (population std over the M members),
    a conservative reward that pays less where the members disagree."""

    @property
    def scores_empty(self) -> bool:
        return all(getattr(m, "scores_empty", True) for m in self.members)

    def __init__(self, members: Sequence[Reward], mode: str = "mean", k: float = 1.0) -> None:
        if not members:
            raise LmlabError("an ensemble needs at least one member reward")
        if mode not in ENSEMBLE_MODES:
            raise LmlabError(f"ensemble mode must be one of {ENSEMBLE_MODES}, got {mode!r}")
        if k < 0:
            raise LmlabError(f"ensemble k must be >= 0, got {k}")
        self.members, self.mode, self.k = list(members), mode, k

    def member_scores(self, prompts, completions: list[str]) -> torch.Tensor:
        """(M, N) scores of every member."""
        return torch.stack([m.score(prompts, completions).float() for m in self.members])

    def score(self, prompts, completions: list[str]) -> torch.Tensor:
        _check_lengths(prompts, completions)
        scores = self.member_scores(prompts, completions)
        mean = scores.mean(0)
        if self.mode == "mean":
            return mean
        return mean - self.k * scores.std(0, correction=0)


class GoldReward:
    """A world's programmatic reward r*(x, y). SortWorld: "dense" (coverage, order, end,
    extra-token penalty) or "sparse" (1 for exactly the sorted symbols, ended).

    ended: None reads whether an answer ended from the END marker in its text; True treats
    every completion as ended (preference pairs and chat-closed answers are)."""

    scores_empty = True

    def __init__(self, world: str = "sort", kind: str = "dense", ended: bool | None = None) -> None:
        if world != "sort":
            raise LmlabError(f"no programmatic reward for world {world!r}; SortWorld ('sort') has one")
        if kind not in GOLD_KINDS:
            raise LmlabError(f"gold reward kind must be one of {GOLD_KINDS}, got {kind!r}")
        self.world, self.kind, self.ended = world, kind, ended

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        from lmlab.worlds.evaluate import sort_rewards

        _check_lengths(prompts, completions)
        reasons = None if self.ended is None else ["stop" if self.ended else "length"] * len(completions)
        out = sort_rewards(list(prompts), list(completions), reasons)
        return torch.tensor(out[f"gold_{self.kind}"], dtype=torch.float32)
