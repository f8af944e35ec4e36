"""What several stages share: the recipe's data section, the corpus it names, and how a
stage opens another's outputs by name."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError


@dataclass(frozen=True)
class DataConfig:
    source: str = "embedded"  # "embedded" (the shipped corpus) or a path build_shards reads
    tokenizer: str | None = None  # an existing tokenizer.json / .model; None: train one
    vocab_size: int = 4096
    seq_len: int = 128
    val_fraction: float = 0.02
    text_field: str = "text"  # JSONL / Parquet column holding the text


def corpus_texts(data: DataConfig) -> Any:
    """The embedded corpus as a list of texts, or the path build_shards and the tokenizer
    trainer read."""
    if data.source == "embedded":
        from lmlab.data.corpus import embedded_corpus_texts

        return embedded_corpus_texts()
    return data.source


def texts(data: DataConfig):
    source = corpus_texts(data)
    if isinstance(source, list):
        return source
    from lmlab.data.sources import read_texts

    return read_texts(source, text_field=data.text_field)


def require(path: Path, stage: str) -> Path:
    """`path`, an output of `stage`, or a clear error saying that stage must run first."""
    if not path.exists():
        raise LmlabError(f"{path} not found: the {stage!r} stage has not completed in this run directory; "
                         f"run it first (e.g. `lmlab run --from {stage} --run-dir ...`)")
    return path


def model_dir(run_dir: Path, stage: str) -> Path:
    return require(run_dir / stage / "model", stage)


def tokenizer_file(run_dir: Path) -> Path:
    return require(run_dir / "tokenizer" / "tokenizer.json", "tokenizer")
