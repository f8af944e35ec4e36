"""How many parameters train, and what weights, gradients and optimizer state will cost."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

# Optimizer state per trainable element, in elements of float32 (AdamW keeps exp_avg and
# exp_avg_sq in float32; SGD with momentum keeps one buffer).
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1, "none": 0}


@dataclass(frozen=True)
class ParameterReport:
    total: int
    trainable: int
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    optimizer: str
    adapted: tuple[str, ...] = field(default=())

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes

    def format(self) -> str:
        lines = [
            f"parameters: {self.total:,} total, {self.trainable:,} trainable "
            f"({self.trainable_percent:.3f}%)",
            f"memory estimate: weights {_mib(self.weight_bytes)}, gradients {_mib(self.grad_bytes)}, "
            f"{self.optimizer} state {_mib(self.optimizer_bytes)}, total {_mib(self.total_bytes)} "
            "(activations not included)",
        ]
        if self.adapted:
            lines.append(f"adapted modules: {len(self.adapted)} (e.g. {', '.join(self.adapted[:3])})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "parameters": self.total, "trainable": self.trainable,
            "trainable_percent": self.trainable_percent, "weight_bytes": self.weight_bytes,
            "grad_bytes": self.grad_bytes, "optimizer_bytes": self.optimizer_bytes,
            "optimizer": self.optimizer, "adapted_modules": len(self.adapted),
        }


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def parameter_report(model: nn.Module, optimizer: str = "adamw",
                     adapted: list[str] | tuple[str, ...] = ()) -> ParameterReport:
    """Counts unique parameters (a tied embedding once). Gradients take the parameter's own
    dtype; optimizer state is float32 as torch's AdamW keeps it for float32 parameters."""
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {sorted(OPTIMIZER_STATES)}")
    params = list({id(p): p for p in model.parameters()}.values())
    trainable = [p for p in params if p.requires_grad]
    return ParameterReport(
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in trainable),
        weight_bytes=sum(p.numel() * p.element_size() for p in params),
        grad_bytes=sum(p.numel() * p.element_size() for p in trainable),
        optimizer_bytes=sum(p.numel() * 4 * OPTIMIZER_STATES[optimizer] for p in trainable),
        optimizer=optimizer,
        adapted=tuple(adapted),
    )
