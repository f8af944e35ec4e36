"""Weight-only quantisation for CPU inference: every nn.Linear of a Transformer (and the
output head, a quantised copy of a tied embedding included) becomes a `QuantLinear` that
keeps integer weights plus scales and computes y = x @ dequant(W).T.

Formats (w is the float weight, q the stored integer code):
- int8: symmetric, one scale per output row: w = q * s, q in [-127, 127], s = max|w_row| / 127.
- int4: one scale (and zero) per `group_size` consecutive inputs of a row:
  w = (q - 8) * s + z with q in [0, 15]. With `zero_point` the grid spans the group's
  [min, max] (s = (max - min) / 15, z = min + 8 s); without, it is symmetric
  (s = max|w| / 7, z = 0).

Decoding at batch 1 reads every weight once per token, so the step time is bounded by the
bytes of weights read; int8 and int4 cut those bytes by 4x and ~7x against float32. The
matmuls go through PyTorch's own CPU kernels, `aten._weight_int8pack_mm` and
`aten._weight_int4pack_mm_for_cpu`; on a device or shape they do not serve, a layer falls
back to dequantising its weight in every call (correct, slower). Ragged shapes are
zero-padded to what the kernels need (int8: K to 16; int4: K to the group, N to 16). The kernels are fast only
for bfloat16 activations (float32 takes a slow reference path in torch 2.13), so
activations are cast to `compute_dtype` (bfloat16 by default) around each quantised matmul;
everything else (embedding, norms, attention, residual stream) keeps the model's dtype.

MoE expert stacks (`GroupedLinear`) and MoE routers stay in float: the router's top-k is
sensitive to small logit changes and tiny, and the expert stacks have no packed kernel here.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ModelConfig, from_mapping
from lmlab.errors import LmlabError

FORMATS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 CPU kernel accepts
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
# Modules left in float (see the module docstring).
SKIPPED = ("router",)
INT8_K_BLOCK = 16


@dataclass(frozen=True)
class QuantConfig:
    format: str = "int8"
    group_size: int = 32  # int4 only: inputs sharing one scale
    zero_point: bool = True  # int4 only: asymmetric [min, max] grid per group
    compute_dtype: str = "bfloat16"  # activations fed to the quantised matmuls

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise LmlabError(f"unknown quantisation format {self.format!r}: use one of {', '.join(FORMATS)}")
        if self.format == "int4" and self.group_size not in GROUP_SIZES:
            raise LmlabError(f"int4 group_size must be one of {GROUP_SIZES}, got {self.group_size}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise LmlabError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")

    @property
    def dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.compute_dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantConfig":
        return from_mapping(cls, data, where="quantization")


# ---------------------------------------------------------------------------------------
# Pure math: quantise / dequantise / pack
# ---------------------------------------------------------------------------------------


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (N, K) int8 codes and (N,) float32 scales, w ~= q * s."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def quantize_int4(w: torch.Tensor, group_size: int, zero_point: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float, K a multiple of group_size -> (N, K) uint8 codes in [0, 15] and
    (N, K / group_size) float32 scales and zeros, w ~= (q - 8) * s + z."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    g = w.detach().float().reshape(n, k // group_size, group_size)
    if zero_point:
        lo, hi = g.amin(-1), g.amax(-1)
        scale = (hi - lo) / 15
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15)
        zero = lo + 8 * scale
    else:
        scale = g.abs().amax(-1) / 7
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(g / scale[..., None]).clamp(-8, 7) + 8
        zero = torch.zeros_like(scale)
    return q.reshape(n, k).to(torch.uint8), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = q.shape
    g = q.float().reshape(n, k // group_size, group_size)
    return ((g - 8) * scale.float()[..., None] + zero.float()[..., None]).reshape(n, k)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15], K even -> (N, K/2) uint8; even inputs in the low nibble.
    This portable layout is what is saved; the kernel's own layout depends on the CPU."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def kernel_available(fmt: str, device: str, dtype: torch.dtype) -> bool:
    """Whether torch has a working packed kernel for `fmt` on `device` with `dtype`
    activations (tried once on a tiny matrix)."""
    try:
        x = torch.ones(1, 64, dtype=dtype, device=device)
        if fmt == "int8":
            y = torch.ops.aten._weight_int8pack_mm(
                x, torch.ones(16, 64, dtype=torch.int8, device=device), torch.ones(16, dtype=dtype, device=device))
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                torch.full((16, 64), 9, dtype=torch.int32, device=device), 1)
            sz = torch.stack((torch.ones(2, 16), torch.zeros(2, 16)), -1).to(device, dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
        return bool(torch.allclose(y.float(), torch.full_like(y.float(), 64.0)))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


class QuantLinear(nn.Module):
    """A weight-only quantised nn.Linear (inference only).

    Persistent buffers (what is saved): `qweight` (int8 (N, K), or int4 codes packed two per
    byte, (N, K'/2) with K' = K rounded up to the group size), `scales`, int4's `zeros`, and
    `bias`. `prepare()` derives the kernel's own operands from them (non-persistent)."""

    def __init__(self, in_features: int, out_features: int, config: QuantConfig, bias: bool = False,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.in_features, self.out_features, self.config = in_features, out_features, config
        n, k = out_features, in_features
        if config.format == "int8":
            self.padded_in = k
            self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(n, device=device))
            self.zeros = None
        else:
            g = config.group_size
            self.padded_in = -(-k // g) * g  # the kernel needs whole groups
            self.register_buffer("qweight", torch.zeros(n, self.padded_in // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.ones(n, self.padded_in // g, device=device))
            self.register_buffer("zeros", torch.zeros(n, self.padded_in // g, device=device))
        self.register_buffer("bias", torch.zeros(n, device=device) if bias else None)
        self.kernel = "dequantise"
        self.register_buffer("_kweight", None, persistent=False)
        self.register_buffer("_kscales", None, persistent=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, config: QuantConfig) -> "QuantLinear":
        n, k = weight.shape
        module = cls(k, n, config, bias=bias is not None, device=weight.device)
        with torch.no_grad():
            if config.format == "int8":
                q, scale = quantize_int8(weight)
                module.qweight.copy_(q)
                module.scales.copy_(scale)
            else:
                w = F.pad(weight.detach().float(), (0, module.padded_in - k))  # zero inputs
                q, scale, zero = quantize_int4(w, config.group_size, config.zero_point)
                module.qweight.copy_(pack_nibbles(q))
                module.scales.copy_(scale)
                module.zeros.copy_(zero)
            if bias is not None:
                module.bias.copy_(bias.detach().float())
        return module.prepare()

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> "QuantLinear":
        return cls.from_weight(linear.weight, linear.bias, config)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 (N, K) weight this module multiplies by."""
        if self.config.format == "int8":
            return dequantize_int8(self.qweight, self.scales)
        w = dequantize_int4(unpack_nibbles(self.qweight), self.scales, self.zeros, self.config.group_size)
        return w[:, : self.in_features]

    @torch.no_grad()
    def prepare(self) -> "QuantLinear":
        """Build the kernel operands (after construction or loading)."""
        cfg, dev = self.config, self.qweight.device
        self._kweight = self._kscales = None
        self.kernel = "dequantise"
        if not kernel_available(cfg.format, dev.type, cfg.dtype):
            return self
        if cfg.format == "int8":
            # The bfloat16 kernel reads K in blocks of 16 and crashes or miscomputes on a
            # ragged tail (torch 2.13, AVX-512): pad the inputs with zero weights.
            pad = -self.in_features % INT8_K_BLOCK
            self._kweight = F.pad(self.qweight, (0, pad)) if pad else self.qweight
            self._kscales = self.scales.to(cfg.dtype)
            self.kernel = "aten._weight_int8pack_mm"
        else:
            # The kernel packs 16 output rows at a time: pad with zero rows, sliced off after.
            pad = -self.out_features % 16
            codes = F.pad(unpack_nibbles(self.qweight).to(torch.int32), (0, 0, 0, pad))
            self._kweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            # The kernel wants (K'/G, N, 2): scale and zero per group, input-group-major.
            sz = torch.stack((self.scales.t(), self.zeros.t()), -1)
            self._kscales = F.pad(sz, (0, 0, 0, pad)).contiguous().to(cfg.dtype)
            self.kernel = "aten._weight_int4pack_mm_for_cpu"
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(cfg.dtype)
        if self.kernel == "dequantise":
            y = F.linear(x2, self.dequantized_weight().to(cfg.dtype))
        else:
            width = self._kweight.shape[1] * (2 if cfg.format == "int4" else 1)
            if width != self.in_features:
                x2 = F.pad(x2, (0, width - self.in_features))
            if cfg.format == "int8":
                y = torch.ops.aten._weight_int8pack_mm(x2, self._kweight, self._kscales)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self._kweight, cfg.group_size, self._kscales)
                if y.shape[-1] != self.out_features:
                    y = y[:, : self.out_features]
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def weight_bytes(self) -> int:
        """Bytes of weights and scales one forward reads (the kernel's operands where it runs)."""
        if self._kweight is not None:
            tensors = [self._kweight, self._kscales]
        else:
            tensors = [self.qweight, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        group = f", group_size={self.config.group_size}" if self.config.format == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.config.format}{group}, kernel={self.kernel}")


# ---------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in SKIPPED]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(model: nn.Module, fmt: str = "int8", group_size: int = 32, zero_point: bool = True,
                   compute_dtype: str = "bfloat16") -> nn.Module:
    """Replace every nn.Linear of `model` (an lmlab Transformer) in place by a QuantLinear,
    the output head included: a tied embedding keeps its float table for the lookups and
    gets a quantised copy as `lm_head`. Returns the model, in eval mode."""
    config = QuantConfig(fmt, group_size, zero_point, compute_dtype)
    if getattr(model, "quantization", None) is not None:
        raise LmlabError("this model is already quantised; quantise the float checkpoint instead")
    from lmlab.adapters.lora import LoRAMixin

    if any(isinstance(m, LoRAMixin) for m in model.modules()):
        raise LmlabError("this model carries LoRA/DoRA adapters: fold them in first with "
                         "lmlab.adapters.inject.strip_adapters(model), then quantise")
    names = _linear_names(model)
    for name in names:
        _replace(model, name, QuantLinear.from_linear(model.get_submodule(name), config))
    if getattr(model, "lm_head", None) is None:
        model.lm_head = QuantLinear.from_weight(model.embed.weight, None, config)
        names.append("lm_head")
    model.quantization = config
    model.quantized_modules = sorted(names)
    return model.eval().requires_grad_(False)


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of matmul weights one decoding step reads (the embedding lookup reads B rows,
    not the table, so it is not counted; a tied float head is)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.weight_bytes()
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif type(m).__name__ == "GroupedLinear":
            total += m.weight.numel() * m.weight.element_size()
    if getattr(model, "lm_head", 0) is None:
        total += model.embed.weight.numel() * model.embed.weight.element_size()
    return total


def save_quantized(model: nn.Module, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write a quantised model: model.safetensors (codes, scales, float rest) and a
    config.json whose "quantization" record says how to rebuild it. Config last."""
    from lmlab import __version__
    from lmlab.checkpoint import CONFIG_FILE, FORMAT, TOKENIZER_FILE, WEIGHTS_FILE, save_state_dict
    from lmlab.io import atomic_path, write_json_atomic

    config = getattr(model, "quantization", None)
    if config is None:
        raise LmlabError("save_quantized needs a quantised model: call quantize_model(model, fmt) first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_state_dict(model.state_dict(), out_dir / WEIGHTS_FILE, metadata={"quantization": config.format})
    if tokenizer is not None:
        with atomic_path(out_dir / TOKENIZER_FILE) as tmp:
            tokenizer.save(str(tmp))
    meta = {"format": FORMAT, "version": __version__, "model": model.config.to_dict(),
            "quantization": {**config.to_dict(), "modules": list(model.quantized_modules)}}
    write_json_atomic(out_dir / CONFIG_FILE, meta)
    return out_dir


def is_quantized_dir(path: str | Path) -> bool:
    from lmlab.checkpoint import read_config_json

    return "quantization" in read_config_json(path)


def load_quantized(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a model written by `save_quantized`, without materialising float weights."""
    from lmlab.checkpoint import WEIGHTS_FILE, load_state_dict, read_config_json
    from lmlab.model.transformer import Transformer

    path = Path(path)
    if not path.exists():
        raise LmlabError(f"model path does not exist: {path}")
    meta = read_config_json(path)
    record = meta.get("quantization")
    if record is None:
        raise LmlabError(f"{path} is not a quantised checkpoint; load it with load_model, or quantise it "
                         "with quantize_model and save_quantized")
    record = dict(record)
    names = record.pop("modules", None)
    if not isinstance(names, list):
        raise LmlabError(f"{path}/config.json: quantization.modules must list the quantised modules; re-save it")
    config = QuantConfig.from_dict(record)
    cfg = ModelConfig.from_dict(meta["model"])
    state = load_state_dict(path / WEIGHTS_FILE)
    with torch.device("meta"):
        model = Transformer(cfg)
    for name in names:
        if name == "lm_head" and model.lm_head is None:
            n, k = cfg.vocab_size, cfg.d_model
            has_bias = False
        else:
            try:
                linear = model.get_submodule(name)
            except AttributeError:
                raise LmlabError(f"{path}: quantised module {name!r} is not in the model its config "
                                 "describes; the config and weights come from different models") from None
            n, k, has_bias = linear.out_features, linear.in_features, linear.bias is not None
        _replace(model, name, QuantLinear(k, n, config, bias=has_bias, device="meta"))
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise LmlabError(f"{path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                         "the config and weights come from different models")
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise LmlabError(f"{path}: {e}; the config and weights come from different models") from None
    model.reset_rope()
    model = model.to(device)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.prepare()
    model.quantization = config
    model.quantized_modules = sorted(names)
    return model.eval().requires_grad_(False)


__all__ = [
    "QuantConfig", "QuantLinear", "quantize_model", "save_quantized", "load_quantized", "is_quantized_dir",
    "quantize_int8", "dequantize_int8", "quantize_int4", "dequantize_int4", "pack_nibbles", "unpack_nibbles",
    "kernel_available", "weight_bytes_per_token",
]
