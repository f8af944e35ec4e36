"""Training configuration: one frozen dataclass, loaded strictly (typos name the closest key),
plus the recipe format (`model:`, `data:`, `train:` ... sections) and `--set a.b=v` overrides."""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from lmlab.config import from_mapping
from lmlab.errors import LmlabError

SCHEDULES = ("cosine", "wsd", "constant")
NONFINITE = ("stop", "skip")
DISTRIBUTED = ("auto", "ddp", "fsdp")
FROZEN_PLACEMENT = ("auto", "replicate", "shard")


@dataclass(frozen=True)
class TrainConfig:
    # Length: `tokens` (if set) wins over `steps`; steps = ceil(tokens / tokens per step).
    steps: int = 100
    tokens: int | None = None
    # Sequences per optimizer step, and per forward pass; accumulation = batch / micro.
    batch_size: int = 8
    micro_batch_size: int | None = None  # None: no accumulation
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # Decoupled decay on matrices only; norms, biases and embeddings are not decayed
    # (shrinking a norm gain or an embedding row toward 0 is not regularisation we want).
    weight_decay: float = 0.1
    warmup_steps: int = 0
    schedule: str = "cosine"
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying at the end
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    grad_clip: float = 1.0  # global L2 norm; 0 disables
    # auto: bf16 where the device runs it natively (lmlab.precision), else float32.
    precision: str = "auto"
    compile: bool = False
    eval_every: int = 0  # 0: only at the end (if there is validation data)
    eval_batches: int = 4
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2  # older step-N directories are pruned; 0 keeps all
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    # A NaN/inf loss or gradient: "stop" (raise, keeping the last good checkpoint) or
    # "skip" (drop that step's update and go on; the count is logged).
    on_nonfinite: str = "stop"
    # Under torchrun (world size > 1; lmlab.train.distributed): "ddp" replicates the trained
    # modules, "fsdp" shards them per transformer block (FSDP2); auto = ddp. Frozen modules
    # (a reference, a reward model): "shard" (fsdp only) or "replicate"; auto = shard under
    # fsdp, replicate under ddp. batch_size and micro_batch_size stay global: each rank
    # takes micro_batch_size / world_size sequences per forward.
    distributed: str = "auto"
    distributed_frozen: str = "auto"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise LmlabError(f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        from lmlab.precision import parse

        object.__setattr__(self, "precision", parse(self.precision))
        if self.on_nonfinite not in NONFINITE:
            raise LmlabError(f"train.on_nonfinite must be one of {NONFINITE}, got {self.on_nonfinite!r}")
        if self.distributed not in DISTRIBUTED:
            raise LmlabError(f"train.distributed must be one of {DISTRIBUTED}, got {self.distributed!r}")
        if self.distributed_frozen not in FROZEN_PLACEMENT:
            raise LmlabError(f"train.distributed_frozen must be one of {FROZEN_PLACEMENT}, "
                             f"got {self.distributed_frozen!r}")
        for name in ("steps", "batch_size", "eval_batches", "log_every"):
            if getattr(self, name) <= 0:
                raise LmlabError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.tokens is not None and self.tokens <= 0:
            raise LmlabError(f"train.tokens must be positive, got {self.tokens}")
        if self.micro_batch_size is not None and (
            self.micro_batch_size <= 0 or self.batch_size % self.micro_batch_size
        ):
            raise LmlabError(
                f"train.batch_size={self.batch_size} must be a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise LmlabError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            raise LmlabError(f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise LmlabError("train.lr must be positive; warmup_steps and grad_clip non-negative")

    @property
    def micro(self) -> int:
        return self.micro_batch_size or self.batch_size

    @property
    def accumulation(self) -> int:
        return self.batch_size // self.micro

    def total_steps(self, seq_len: int) -> int:
        if self.tokens is None:
            return self.steps
        return max(1, math.ceil(self.tokens / (self.batch_size * seq_len)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        return from_mapping(cls, data, where="train")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars: 3e-4, true, null, [1, 2], 'text'."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(recipe: Mapping[str, Any], overrides: list[str],
                    sections: Mapping[str, type] | None = None) -> dict[str, Any]:
    """Return a copy of `recipe` with each `section.key=value` applied.

    Keys of sections with a dataclass in `sections` are checked here so a typo names the
    closest key before any work starts; other sections are checked by their own loaders.
    """
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in recipe.items()}
    for item in overrides:
        if "=" not in item:
            raise LmlabError(f"--set {item!r}: expected section.key=value, e.g. --set train.lr=3e-4")
        path, text = item.split("=", 1)
        parts = path.strip().split(".")
        value = _parse_value(text)
        if len(parts) == 1:
            out[parts[0]] = value
            continue
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, Mapping):
                raise LmlabError(f"--set {path}: {'.'.join(parts[:depth + 1])} is not a section")
            node[part] = child = dict(child)
            node = child
        section, key = parts[0], parts[-1]
        if sections and section in sections and len(parts) == 2:
            valid = [f.name for f in fields(sections[section])]
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
                hint = f"did you mean {section}.{close[0]}?" if close else f"valid keys: {', '.join(valid)}"
                raise LmlabError(f"--set {path}: unknown key {section}.{key!r}; {hint}")
        node[key] = value
    return out
