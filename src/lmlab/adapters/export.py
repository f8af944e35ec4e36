"""Fold a saved adapter into its base model and write a plain checkpoint (for serving,
conversion to Hugging Face, or any command that reads a model directory)."""
from __future__ import annotations

from pathlib import Path

from lmlab.adapters.inject import load_adapter, strip_adapters
from lmlab.checkpoint import CONFIG_FILE, TOKENIZER_FILE, save_model
from lmlab.hub import load_model
from lmlab.io import staged_dir


def merge_adapter_into(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                       overwrite: bool = False) -> Path:
    """base + adapter -> out_dir (safetensors + config.json, the base's tokenizer copied).

    `out_dir` is built beside its destination and swapped in when complete. It may not be
    the base or the adapter, nor lie inside either; an existing non-empty `out_dir` is
    refused unless `overwrite` (then only the files written here are replaced)."""
    with staged_dir(out_dir, overwrite=overwrite, marker=CONFIG_FILE, inputs=(base_dir, adapter_dir),
                    what="merged model directory") as staging:
        model = load_model(base_dir)
        load_adapter(model, adapter_dir)
        strip_adapters(model)
        tokenizer = None
        if (Path(base_dir) / TOKENIZER_FILE).is_file():
            from lmlab.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(Path(base_dir) / TOKENIZER_FILE)
        save_model(model, staging, tokenizer=tokenizer, extra={"merged_adapter": str(adapter_dir)})
    return Path(out_dir)
