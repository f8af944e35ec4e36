"""Put LoRA/DoRA adapters into a model, merge/unmerge them, and save/load them alone.

Adaptable modules are nn.Linear and a MoE block's stacked experts (`GroupedLinear`, named
`mlp.gate_proj` / `up_proj` / `down_proj` like a dense MLP's projections), chosen by name
patterns over `model.named_modules()`:
- a glob (`fnmatch`) matched against the full dotted name *or* its last component, so
  `q_proj` hits every layer's query projection and `layers.0.*` only the first block;
- `re:<regex>`: a regular expression that must match the full dotted name.
"""
from __future__ import annotations

import fnmatch
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from lmlab.adapters.dora import DoRAExperts, DoRALinear
from lmlab.adapters.lora import LoRAExperts, LoRALinear, LoRAMixin
from lmlab.adapters.report import ParameterReport, parameter_report
from lmlab.config import from_mapping
from lmlab.errors import LmlabError
from lmlab.io import atomic_path, read_json, write_json_atomic
from lmlab.model.moe import GroupedLinear

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# (base module type, method) -> adapter class
ADAPTER_CLASSES = {(nn.Linear, "lora"): LoRALinear, (nn.Linear, "dora"): DoRALinear,
                   (GroupedLinear, "lora"): LoRAExperts, (GroupedLinear, "dora"): DoRAExperts}


@dataclass(frozen=True)
class AdapterConfig:
    method: str = "lora"  # "lora" or "dora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r
    targets: tuple[str, ...] = ATTENTION + MLP
    # Base parameters to train in full beside the adapters (peft's `modules_to_save`), by
    # the same patterns over module or parameter names, e.g. ("embed", "lm_head") when the
    # chat tokens' rows were never trained in pretraining. Saved with the adapter.
    trainable: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in ("lora", "dora"):
            raise LmlabError(f"adapter.method must be 'lora' or 'dora', got {self.method!r}")
        if self.r <= 0:
            raise LmlabError(f"adapter.r must be a positive rank, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LmlabError(f"adapter.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise LmlabError("adapter.targets is empty: name at least one module pattern, e.g. q_proj")
        for pattern in self.targets + self.trainable:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise LmlabError(f"adapter.targets: bad regex {pattern!r}: {e}") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "adapter") -> "AdapterConfig":
        return from_mapping(cls, data, where)


def matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern)


def adapter_modules(model: nn.Module) -> dict[str, LoRAMixin]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRAMixin)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_adapters(model: nn.Module, cfg: AdapterConfig) -> ParameterReport:
    """Freeze every base parameter and wrap each nn.Linear or expert stack whose name
    matches `cfg.targets`.

    Returns the trainable-parameter and memory report of the adapted model."""
    if adapter_modules(model):
        raise LmlabError("this model already has adapters; merge them (merge_adapters) first")
    adaptable = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, GroupedLinear))}
    chosen = [n for n in adaptable if any(matches(n, p) for p in cfg.targets)]
    if not chosen:
        examples = ", ".join(list(adaptable)[:6])
        raise LmlabError(
            f"adapter.targets {list(cfg.targets)} match no nn.Linear or expert module; "
            f"module names look like: {examples}"
        )
    extra = trainable_base_parameters(model, cfg.trainable)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in extra.values():
        p.requires_grad_(True)
    for name in chosen:
        base = adaptable[name]
        cls = ADAPTER_CLASSES[(GroupedLinear if isinstance(base, GroupedLinear) else nn.Linear, cfg.method)]
        _set_submodule(model, name, cls(base, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora))
    model.adapter_config = cfg
    return parameter_report(model, adapted=chosen)


def trainable_base_parameters(model: nn.Module, patterns: tuple[str, ...]) -> dict[str, nn.Parameter]:
    """Base parameters named by `patterns` (a parameter matches through its own name or its
    module's name)."""
    chosen = {}
    for name, param in model.named_parameters():
        module_name = name.rpartition(".")[0]
        if any(matches(name, p) or (module_name and matches(module_name, p)) for p in patterns):
            chosen[name] = param
    missing = [p for p in patterns if not any(
        matches(n, p) or matches(n.rpartition(".")[0], p) for n in chosen)]
    if missing:
        raise LmlabError(f"adapter.trainable patterns {missing} match no parameter; "
                         f"parameter names look like: {', '.join(list(dict(model.named_parameters()))[:4])}")
    return chosen


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight (outputs are unchanged; forward is plain)."""
    for module in adapter_modules(model).values():
        module.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Undo `merge_adapters`: the base weights return (up to float rounding)."""
    for module in adapter_modules(model).values():
        module.unmerge()


@contextmanager
def disabled_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its base while the block lasts: every adapter is bypassed (its
    forward is the frozen base module's alone), with no second copy of the weights. DPO's
    reference when training LoRA/DoRA. Base parameters that `adapter_config.trainable`
    names are *not* restored: they are trained in place, so the caller must check them."""
    modules = adapter_modules(model)
    if not modules:
        raise LmlabError("this model has no adapters to disable; the adapter-disabled reference needs a "
                         "LoRA/DoRA policy (method lora or dora), or give a separate reference model")
    merged = [n for n, m in modules.items() if m.merged]
    if merged:
        raise LmlabError(f"{merged[0]} is merged into its base weight, so the base cannot be recovered by "
                         "disabling it; unmerge_adapters(model) first")
    previous = {n: m.disabled for n, m in modules.items()}
    for m in modules.values():
        m.disabled = True
    try:
        yield model
    finally:
        for n, m in modules.items():
            m.disabled = previous[n]


def strip_adapters(model: nn.Module) -> nn.Module:
    """Merge and replace every adapter by its plain base module: the model is then an
    ordinary `Transformer` that `checkpoint.save_model` exports like any other."""
    for name, module in adapter_modules(model).items():
        _set_submodule(model, name, module.to_base())
    if hasattr(model, "adapter_config"):
        del model.adapter_config
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors keyed `<module>.lora_A|lora_B|magnitude`, plus the base parameters
    that `adapter_config.trainable` names, under their own names."""
    cfg = getattr(model, "adapter_config", None)
    state = {}
    if cfg is not None and cfg.trainable:
        for name, param in trainable_base_parameters(model, cfg.trainable).items():
            state[name] = param.detach().contiguous().cpu()
    for name, module in adapter_modules(model).items():
        if module.merged:
            raise LmlabError(f"{name} is merged; unmerge_adapters(model) before saving the adapter alone")
        for key, tensor in module.adapter_state().items():
            state[f"{name}.{key}"] = tensor.detach().contiguous().cpu()
    return state


def save_adapter(model: nn.Module, directory: str | Path, base: str | Path | None = None) -> Path:
    """Write only the adapter: `adapter.safetensors` + `adapter_config.json`. With `base`
    (the model directory it was trained on) also a `config.json` of kind `adapter` naming
    it, so `lmlab.load_model(directory)` opens base + adapter as one model."""
    from safetensors.torch import save_file

    cfg = getattr(model, "adapter_config", None)
    if cfg is None:
        raise LmlabError("this model has no adapters to save; call apply_adapters first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / ADAPTER_WEIGHTS) as tmp:
        save_file(adapter_state_dict(model), str(tmp), metadata={"format": "lmlab-adapter"})
    write_json_atomic(directory / ADAPTER_CONFIG, asdict(cfg))
    if base is not None:
        import os

        from lmlab import __version__

        # Relative to the adapter, so a run directory moved as a whole still opens.
        rel = os.path.relpath(Path(base).resolve(), directory.resolve())
        write_json_atomic(directory / "config.json", {"format": "lmlab", "kind": "adapter", "base": rel,
                                                      "version": __version__})
    return directory


def load_adapter_config(directory: str | Path) -> AdapterConfig:
    path = Path(directory) / ADAPTER_CONFIG
    data = read_json(path, "point at an adapter directory written by save_adapter")
    return AdapterConfig.from_dict(data, where=str(path))


def load_adapter(model: nn.Module, directory: str | Path) -> ParameterReport:
    """Adapt `model` as the saved config says and load the saved adapter weights into it."""
    from lmlab.checkpoint import load_state_dict

    cfg = load_adapter_config(directory)
    weights = Path(directory) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise LmlabError(f"no {ADAPTER_WEIGHTS} in {directory}: the adapter was not saved completely")
    report = apply_adapters(model, cfg)
    state = load_state_dict(weights)  # a truncated or non-safetensors file is an LmlabError
    own = {f"{n}.{k}": t for n, m in adapter_modules(model).items() for k, t in m.adapter_state().items()}
    own.update(trainable_base_parameters(model, cfg.trainable))
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise LmlabError(
            f"adapter in {directory} does not fit this model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); load it onto the base model it was trained on"
        )
    with torch.no_grad():
        for key, param in own.items():
            if state[key].shape != param.shape:
                raise LmlabError(
                    f"adapter tensor {key} has shape {tuple(state[key].shape)} but this model "
                    f"needs {tuple(param.shape)}; load it onto the base model it was trained on"
                )
            param.copy_(state[key])
    return report
