"""LoRA (Hu et al., 2021): a frozen weight plus a trainable low-rank update s·B·A.

`LoRALinear` *is* an nn.Linear and `LoRAExperts` *is* a `GroupedLinear` (a MoE block's
stacked experts); each shares the base module's weight (and bias) Parameters, so the base
keys of a state dict (`...q_proj.weight`) are unchanged by adapting a model. The adapter
adds `lora_A` (r, in) and `lora_B` (out, r) next to them, one pair per expert — (E, r, in)
and (E, out, r) — for experts: every expert gets its own rank-r update, as in peft's
`target_parameters`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.model.moe import GroupedLinear, grouped_linear


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters of a 16-bit base are kept in float32 (as peft does): their small updates
    would round away in bf16/fp16, and they are few enough that the memory is negligible."""
    return torch.float32 if base_dtype in (torch.bfloat16, torch.float16) else base_dtype


def lora_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """alpha/r (the paper), or alpha/sqrt(r) (rsLoRA: keeps the update's scale stable in r)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRAMixin:
    """What LoRA on a (..., out, in) weight needs beyond the base module's forward, for a
    plain weight (no leading dims) and for stacked experts (leading dim E) alike."""

    def _adopt(self, base: nn.Module, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        lead = tuple(self.weight.shape[:-2])
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = lora_scaling(alpha, r, rslora)
        factory = {"device": self.weight.device, "dtype": adapter_dtype(self.weight.dtype)}
        self.lora_A = nn.Parameter(torch.empty(*lead, r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(*lead, self.out_features, r, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False  # set by `disabled_adapters`: forward is the base's alone
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A ~ U(±1/sqrt(in)), which is nn.Linear's default kaiming-uniform(a=sqrt(5)) (as in
        the paper's code and peft) for each expert's (r, in) slice; B = 0, so the adapted
        model starts out exactly equal to the base."""
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.lora_A, -bound, bound)
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """s · B A, shaped like the weight."""
        return self.scaling * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def extra_repr(self) -> str:
        experts = f"n_experts={self.weight.shape[0]}, " if self.weight.dim() == 3 else ""
        return (f"{experts}in_features={self.in_features}, out_features={self.out_features}, "
                f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}")


class LoRALinear(LoRAMixin, nn.Linear):
    """y = x W^T + b + s · dropout(x) A^T B^T, with W, b frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        nn.Module.__init__(self)  # skip nn.Linear's own allocation: we adopt base's tensors
        self._adopt(base, r, alpha, dropout, rslora)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def lora_out(self, x: torch.Tensor) -> torch.Tensor:
        """B A x in the adapter's dtype (x is cast to it first)."""
        return F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return y
        return y + (self.scaling * self.lora_out(self.dropout(x))).to(y.dtype)

    def to_base(self) -> nn.Linear:
        """A plain nn.Linear holding the merged weight (for export)."""
        self.merge()
        # On meta: the new module only borrows this one's Parameters, nothing is allocated.
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        out.weight = self.weight
        out.bias = self.bias
        return out


class LoRAExperts(LoRAMixin, GroupedLinear):
    """Per expert e: rows of group e get x W_e^T + s · dropout(x) A_e^T B_e^T, W frozen; the
    low-rank products run as grouped matmuls like the base."""

    def __init__(self, base: GroupedLinear, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        nn.Module.__init__(self)
        self.n_experts = base.n_experts
        self._adopt(base, r, alpha, dropout, rslora)

    def lora_out(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return grouped_linear(grouped_linear(x.to(self.lora_A.dtype), self.lora_A, counts), self.lora_B, counts)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        y = grouped_linear(x, self.weight, counts)
        if self.merged or self.disabled:
            return y
        return y + (self.scaling * self.lora_out(self.dropout(x), counts)).to(y.dtype)

    def to_base(self) -> GroupedLinear:
        self.merge()
        out = GroupedLinear(self.n_experts, self.in_features, self.out_features)
        out.weight = self.weight
        return out
