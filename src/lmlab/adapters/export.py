"""Fold a saved adapter into its base model and write a plain checkpoint (for serving,
conversion to Hugging Face, or any command that reads a model directory)."""
from __future__ import annotations

from pathlib import Path

from lmlab.adapters.inject import load_adapter, strip_adapters
from lmlab.checkpoint import TOKENIZER_FILE, save_model
from lmlab.hub import load_model


def merge_adapter_into(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """base + adapter -> out_dir (safetensors + config.json, the base's tokenizer copied)."""
    model = load_model(base_dir)
    load_adapter(model, adapter_dir)
    strip_adapters(model)
    tokenizer = None
    if (Path(base_dir) / TOKENIZER_FILE).is_file():
        from lmlab.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(Path(base_dir) / TOKENIZER_FILE)
    return save_model(model, out_dir, tokenizer=tokenizer, extra={"merged_adapter": str(adapter_dir)})
