"""The objective interface every training signal implements (LM, SFT, reward, DPO, PPO).

An objective is a callable `objective(model, batch) -> (loss, metrics)`: `loss` a scalar
tensor (the mean over the batch's loss units), `metrics` a dict of floats or 0-d tensors to
log. It owns no optimizer, schedule, checkpoint or logging: the one loop in
`lmlab.train.loop` does. Two optional methods let the loop accumulate gradients exactly:
`weight(batch)` is how many loss units (target tokens, preference pairs, ...) the mean
runs over, so micro-batches combine as a weighted mean; `tokens(batch)` is what tokens/s
counts. Both default to the batch's leading dimension.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class Objective(Protocol):
    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]: ...


def leading_dim(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
    return len(batch)


def batch_weight(objective: Objective, batch: Any) -> int:
    fn = getattr(objective, "weight", None)
    return fn(batch) if fn is not None else leading_dim(batch)


def batch_tokens(objective: Objective, batch: Any) -> int:
    fn = getattr(objective, "tokens", None)
    return fn(batch) if fn is not None else leading_dim(batch)
