"""The objective interface every training signal implements (LM, SFT, reward, DPO, PPO).

An objective is a callable `objective(model, batch) -> (loss, metrics)`: `loss` a scalar
tensor (the mean over the batch's loss units), `metrics` a dict of floats or 0-d tensors to
log. It owns no optimizer, schedule, checkpoint or logging: the one loop in
`lmlab.train.loop` does. Optional methods the loop uses when present:

- `weight(batch)`: how many loss units (target tokens, preference pairs, ...) the mean runs
  over, so micro-batches combine as a weighted mean (default: the leading dimension);
- `tokens(batch)`: what tokens/s counts (default: the leading dimension);
- `trainable_modules() -> {name: module}`: trained beside the loop's `model` (a value head);
- `frozen_modules() -> {name: module}`: read but never trained (a reference, a reward model);
- `state_dict() -> {name: tensor}` / `load_state_dict(state)`: the objective's own state,
  saved in every step checkpoint and restored on resume;
- `after_step(step)`: called after each optimizer step (EMA reference update, TR-DPO refresh).
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


def _named(objective: Objective, method: str) -> dict[str, nn.Module]:
    fn = getattr(objective, method, None)
    modules = dict(fn()) if fn is not None else {}
    if "model" in modules:
        raise ValueError(f"{type(objective).__name__}.{method}() may not use the name 'model' (the loop's own)")
    return modules


def trainable_modules(objective: Objective) -> dict[str, nn.Module]:
    return _named(objective, "trainable_modules")


def frozen_modules(objective: Objective) -> dict[str, nn.Module]:
    return _named(objective, "frozen_modules")
