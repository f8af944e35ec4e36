"""Model checkpoints: safetensors weights + JSON config (+ tokenizer), written atomically.

Layout of an lmlab model directory:
    config.json        {"format": "lmlab", "version": ..., "model": {ModelConfig fields}, ...}
    model.safetensors  the state dict (tied weights stored once)
    tokenizer.json     optional, the tokenizer the model was trained with
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

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


def save_model(model: Transformer, out_dir: str | Path, tokenizer: Any = None,
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
    meta = {"format": FORMAT, "version": __version__, "model": model.config.to_dict(), **(extra or {})}
    write_json_atomic(out_dir / CONFIG_FILE, meta)
    return out_dir


def read_config_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / CONFIG_FILE if path.is_dir() else path
    return read_json(file, f"no {CONFIG_FILE} in {path}: expected an lmlab checkpoint directory or a "
                           "Hugging Face model directory (config.json + *.safetensors)")


def is_lmlab_dir(path: str | Path) -> bool:
    return read_config_json(path).get("format") == FORMAT


def model_from_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str = "checkpoint",
                          device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    """Build a model around `state` without allocating random weights first."""
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise LmlabError(
            f"{source} does not match its config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; "
            "the config and weights come from different models"
        )
    for name, param in model.state_dict().items():
        if tuple(param.shape) != tuple(state[name].shape):
            raise LmlabError(
                f"{source}: {name} has shape {tuple(state[name].shape)} but the config implies "
                f"{tuple(param.shape)}; the config and weights come from different models"
            )
    model.load_state_dict(state, assign=True)
    model.reset_rope()
    model = model.to(device)
    return model if dtype is None else model.to(dtype)


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    """Load an lmlab checkpoint directory; a Hugging Face directory is converted on the fly."""
    path = Path(path)
    if not path.exists():
        raise LmlabError(f"model path does not exist: {path}")
    meta = read_config_json(path)
    if meta.get("format") != FORMAT:
        from lmlab.interop.hf import load_hf_model

        return load_hf_model(path, device=device, dtype=dtype)
    cfg = ModelConfig.from_dict(meta["model"])
    state = load_state_dict(path / WEIGHTS_FILE)
    return model_from_state_dict(cfg, state, source=str(path), device=device, dtype=dtype)
