"""The small English corpus shipped inside the package (see lmlab/corpus/README.md)."""
from __future__ import annotations

from pathlib import Path


def embedded_corpus_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "corpus" / "python-docs"


def embedded_corpus_files() -> list[Path]:
    return sorted(embedded_corpus_dir().rglob("*.rst"))


def embedded_corpus_texts() -> list[str]:
    """One document per source file, in sorted path order."""
    return [p.read_text(encoding="utf-8") for p in embedded_corpus_files()]
