"""lmlab checkpoints: safetensors weights + JSON config (+ tokenizer), written atomically,
each with a kind that says what the weights are and how to open them.

Layout of an lmlab model directory:
    config.json        {"format": "lmlab", "kind": ..., "version": ..., "model": {ModelConfig}, ...}
    model.safetensors  the state dict (tied weights stored once)
    tokenizer.json     optional, the tokenizer the model was trained with

Kinds:
    lm       a Transformer (the default; checkpoints older than kinds are this)
    reward   a Transformer trunk with a scalar score head (lmlab.model.heads)
    value    the same shape as reward, trained as a PPO critic
    adapter  only LoRA/DoRA weights (adapter.safetensors) over the model named by "base"
A model saved with its adapters still injected (a step checkpoint of a LoRA run) records
"adapter": {AdapterConfig} beside its kind; opening it re-injects them before the weights
load, and folds them in unless asked not to.

This module reads and writes lmlab's own format only; `lmlab.hub` is where formats (lmlab,
Hugging Face, GGUF) are recognised.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.io import atomic_path, read_json, write_json_atomic
from lmlab.model.transformer import Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "lmlab"
KIND_LM, KIND_REWARD, KIND_VALUE, KIND_ADAPTER = "lm", "reward", "value", "adapter"


def _scalar_head_model(cfg: ModelConfig) -> torch.nn.Module:
    from lmlab.model.heads import RewardModel

    return RewardModel(cfg)


def _value_model(cfg: ModelConfig) -> torch.nn.Module:
    from lmlab.model.heads import ValueModel

    return ValueModel(cfg)


# kind -> the module class built (on the meta device) around a checkpoint's weights.
MODEL_KINDS: dict[str, Callable[[ModelConfig], torch.nn.Module]] = {
    KIND_LM: Transformer, KIND_REWARD: _scalar_head_model, KIND_VALUE: _value_model,
}


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise LmlabError(f"{path} is not a readable safetensors file ({e}); re-save or re-convert it") from None


def model_kind(model: torch.nn.Module) -> str:
    return getattr(model, "kind", KIND_LM)


def save_model(model: torch.nn.Module, out_dir: str | Path, tokenizer: Any = None,
               extra: dict[str, Any] | None = None) -> Path:
    """Write `model` (and optionally its tokenizer, anything with `.save(path)`) to `out_dir`.
    The config is written last, so a directory with a config.json is always complete."""
    from lmlab import __version__

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_state_dict(model.state_dict(), out_dir / WEIGHTS_FILE)
    if tokenizer is not None:
        with atomic_path(out_dir / TOKENIZER_FILE) as tmp:
            tokenizer.save(str(tmp))
    meta = {"format": FORMAT, "kind": model_kind(model), "version": __version__,
            "model": model.config.to_dict(), **(extra or {})}
    adapter = getattr(model, "adapter_config", None)
    if adapter is not None:
        meta["adapter"] = asdict(adapter)
    write_json_atomic(out_dir / CONFIG_FILE, meta)
    return out_dir


def read_config_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / CONFIG_FILE if path.is_dir() else path
    return read_json(file, f"no {CONFIG_FILE} in {path}: expected an lmlab checkpoint directory or a "
                           "Hugging Face model directory (config.json + *.safetensors)")


def is_lmlab_dir(path: str | Path) -> bool:
    return read_config_json(path).get("format") == FORMAT


def checkpoint_kind(path: str | Path) -> str:
    """The kind of the lmlab checkpoint at `path` (`lm` for those saved before kinds)."""
    meta = read_config_json(path)
    if meta.get("format") != FORMAT:
        raise LmlabError(f"{path} is not an lmlab checkpoint (its config.json has no \"format\": \"lmlab\")")
    return meta.get("kind", KIND_LM)


def _check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LmlabError(
            f"{source} does not match its config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; "
            "the config and weights come from different models"
        )
    for name, param in expected.items():
        if tuple(param.shape) != tuple(state[name].shape):
            raise LmlabError(
                f"{source}: {name} has shape {tuple(state[name].shape)} but the config implies "
                f"{tuple(param.shape)}; the config and weights come from different models"
            )


def model_from_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str = "checkpoint",
                          device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                          kind: str = KIND_LM, adapter: dict[str, Any] | None = None) -> torch.nn.Module:
    """Build a model of `kind` around `state` without allocating random weights first;
    `adapter` (an AdapterConfig mapping) re-injects the adapters the weights include."""
    if kind not in MODEL_KINDS:
        raise LmlabError(f"{source}: unknown checkpoint kind {kind!r}; known: {', '.join(MODEL_KINDS)}")
    with torch.device("meta"):
        model = MODEL_KINDS[kind](cfg)
        if adapter is not None:
            from lmlab.adapters.inject import AdapterConfig, apply_adapters

            apply_adapters(model, AdapterConfig.from_dict(adapter, where=f"{source} adapter"))
    _check_state(model, state, source)
    model.load_state_dict(state, assign=True)
    for module in model.modules():  # rope tables are buffers computed, not stored
        if isinstance(module, Transformer):
            module.reset_rope()
    model = model.to(device)
    return model if dtype is None else model.to(dtype)


def load_lmlab_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                     merge_adapters: bool = True) -> torch.nn.Module:
    """Open an lmlab checkpoint directory as its kind says. A model saved with injected
    adapters comes back plain (adapters folded in) unless `merge_adapters=False`. An
    `adapter` checkpoint needs its base opened first: `lmlab.hub.load_model` does that."""
    path = Path(path)
    meta = read_config_json(path)
    kind = meta.get("kind", KIND_LM)
    if meta.get("format") != FORMAT:
        raise LmlabError(f"{path} is not an lmlab checkpoint (its config.json has no \"format\": \"lmlab\")")
    if kind == KIND_ADAPTER:
        raise LmlabError(f"{path} holds an adapter alone: open it with lmlab.load_model (which loads its "
                         "base first) or `lmlab adapter merge BASE ADAPTER OUT`")
    cfg = ModelConfig.from_dict(meta["model"])
    state = load_state_dict(path / WEIGHTS_FILE)
    model = model_from_state_dict(cfg, state, source=str(path), device=device, dtype=dtype, kind=kind,
                                  adapter=meta.get("adapter"))
    if merge_adapters and meta.get("adapter") is not None:
        from lmlab.adapters.inject import strip_adapters

        strip_adapters(model)
    return model
