"""The one place that recognises model formats and opens a model, whatever it is.

    model = load_model("runs/x/pretrain/model")      # an lmlab checkpoint of any kind
    model = load_model("SmolLM2-135M/")               # a Hugging Face directory, converted on the fly

Each format has a detector (does this path hold it?) and an opener, tried in order. lmlab's
own format lives in `lmlab.checkpoint`, Hugging Face's in `lmlab.interop.hf`; neither knows
about the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lmlab.errors import LmlabError


@dataclass(frozen=True)
class Format:
    name: str
    detect: Callable[[Path], bool]
    open: Callable[..., torch.nn.Module]


def _config(path: Path) -> dict | None:
    """The directory's config.json, None where there is none; a malformed, non-UTF-8 or
    misplaced one is an error naming it (guessing past it would hide the real problem)."""
    from lmlab.io import read_json

    file = path / "config.json"
    if not file.exists():
        return None
    if file.is_dir():
        raise LmlabError(f"{file} is a directory, not a file; a model directory's config.json must be a JSON file")
    meta = read_json(file, "a model directory needs its config.json")
    if not isinstance(meta, dict):
        raise LmlabError(f"{file} must hold a JSON object, got {type(meta).__name__}")
    return meta


def _is_lmlab(path: Path) -> bool:
    meta = _config(path) if path.is_dir() else None
    return meta is not None and meta.get("format") == "lmlab"


def _is_hf(path: Path) -> bool:
    meta = _config(path) if path.is_dir() else None
    return meta is not None and meta.get("format") != "lmlab" and (
        "model_type" in meta or "architectures" in meta)


def _open_lmlab(path: Path, device="cpu", dtype=None, merge_adapters: bool = True):
    from lmlab.checkpoint import KIND_ADAPTER, load_lmlab_model

    meta = _config(path)
    if meta.get("kind") == KIND_ADAPTER:
        return _open_adapter(path, meta, device, dtype, merge_adapters)
    if "quantization" in meta:  # weight-only int8/int4 (lmlab.decode.quant)
        from lmlab.decode.quant import load_quantized

        return load_quantized(path, device=device)
    return load_lmlab_model(path, device=device, dtype=dtype, merge_adapters=merge_adapters)


def _open_adapter(path: Path, meta: dict, device, dtype, merge_adapters: bool):
    """An adapter checkpoint: open the base it names (any format), apply, fold in."""
    from lmlab.adapters.inject import load_adapter, strip_adapters

    base = meta.get("base")
    if not base:
        raise LmlabError(f"{path} is an adapter without a recorded base model; use "
                         "`lmlab adapter merge BASE ADAPTER OUT`, naming the base it was trained on")
    base_path = Path(base)
    if not base_path.is_absolute():
        base_path = (path / base_path).resolve()
    if not base_path.exists():
        raise LmlabError(f"{path}: its base model {base_path} does not exist; "
                         "use `lmlab adapter merge BASE ADAPTER OUT` with the base's new location")
    model = load_model(base_path, device=device)
    load_adapter(model, path)
    if merge_adapters:
        strip_adapters(model)
    return model if dtype is None else model.to(dtype)


def _open_hf(path: Path, device="cpu", dtype=None, merge_adapters: bool = True):
    from lmlab.interop.hf import load_hf_model
    from lmlab.interop.hf_reward import is_hf_reward_dir, load_hf_reward_model

    if is_hf_reward_dir(path):  # *ForSequenceClassification: a reward model
        return load_hf_reward_model(path, device=device, dtype=dtype)
    return load_hf_model(path, device=device, dtype=dtype)


FORMATS: list[Format] = [Format("lmlab", _is_lmlab, _open_lmlab), Format("huggingface", _is_hf, _open_hf)]


def register_format(fmt: Format) -> Format:
    """Add a format (e.g. GGUF) tried after the built-in ones."""
    FORMATS.append(fmt)
    return fmt


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise LmlabError(f"model path does not exist: {path}")
    for fmt in FORMATS:
        if fmt.detect(path):
            return fmt.name
    if path.is_dir() and not (path / "config.json").is_file():
        raise LmlabError(f"no config.json in {path}: expected an lmlab checkpoint directory or a "
                         "Hugging Face model directory (config.json + *.safetensors)")
    raise LmlabError(f"{path} is not a model this version can open; supported: "
                     f"{', '.join(f.name for f in FORMATS)} (a directory with config.json)")


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               merge_adapters: bool = True) -> torch.nn.Module:
    """Open the model at `path` in whichever format it is stored."""
    name = detect_format(path)
    fmt = next(f for f in FORMATS if f.name == name)
    return fmt.open(Path(path), device=device, dtype=dtype, merge_adapters=merge_adapters)
