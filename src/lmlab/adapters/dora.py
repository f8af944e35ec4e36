"""DoRA (Liu et al., 2024): W' = m · (W + s·BA) / ‖W + s·BA‖, the norm taken per output
row of the (out, in) weight (the "column" norm of the paper's (in, out) convention; peft
uses the same axis) and treated as a constant in backward (paper, section 4.3). For stacked
experts every expert has its own magnitude vector: m is (E, out)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.adapters.lora import LoRAExperts, LoRALinear
from lmlab.model.moe import grouped_linear


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output row of an (..., out, in) weight: shape (..., out)."""
    return torch.linalg.vector_norm(weight, dim=-1)


class DoRAMixin:
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        super().__init__(base, r, alpha, dropout, rslora)
        # Initialised to ‖W‖ (B = 0), so the adapted layer starts equal to the base.
        self.magnitude = nn.Parameter(row_norm(self.weight.detach().float()).to(self.lora_A.dtype))
        self.register_buffer("merge_norm", None, persistent=False)

    def direction_norm(self) -> torch.Tensor:
        """‖W + s·BA‖ per output row, detached: no gradient flows through the norm."""
        with torch.no_grad():
            return row_norm(self.weight + self.delta_weight())

    def correction(self, scale: torch.Tensor, base_out: torch.Tensor, lora_out: torch.Tensor) -> torch.Tensor:
        """(m/n)(W + sBA) x - W x, from W x and BA x: the base matmul is shared."""
        return (scale - 1) * base_out + scale * self.scaling * lora_out

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            norm = self.direction_norm()
            self.merge_norm = norm
            merged = (self.magnitude / norm)[..., None] * (self.weight + self.delta_weight())
            self.weight.copy_(merged.to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            base = self.weight * (self.merge_norm / self.magnitude)[..., None] - self.delta_weight()
            self.weight.copy_(base.to(self.weight.dtype))
            self.merge_norm = None
            self.merged = False

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {**super().adapter_state(), "magnitude": self.magnitude}


class DoRALinear(DoRAMixin, LoRALinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return F.linear(x, self.weight, self.bias)
        scale = self.magnitude / self.direction_norm()  # (out,)
        base = F.linear(x, self.weight)
        xd = self.dropout(x)
        # With dropout, W is applied to x and to dropout(x) separately.
        base_d = base if xd is x else F.linear(xd, self.weight)
        y = base + self.correction(scale, base_d, self.lora_out(xd)).to(base.dtype)
        return y if self.bias is None else y + self.bias


class DoRAExperts(DoRAMixin, LoRAExperts):
    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        base = grouped_linear(x, self.weight, counts)
        if self.merged or self.disabled:
            return base
        # Each row is scaled by its own expert's m/n: (E, out) -> (rows, out).
        scale = (self.magnitude / self.direction_norm()).repeat_interleave(counts, dim=0, output_size=x.shape[0])
        xd = self.dropout(x)
        base_d = base if xd is x else grouped_linear(xd, self.weight, counts)
        return base + self.correction(scale, base_d, self.lora_out(xd, counts)).to(base.dtype)
