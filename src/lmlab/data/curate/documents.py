"""Documents as plain dicts (`{"id": str, "text": str, ...metadata}`), a reader that keeps
JSONL metadata (other formats via `lmlab.data.sources`) and an atomic JSONL writer. Steps that need several passes take a *re-iterable*
source (a list, or a zero-argument callable returning a fresh iterator) so that nothing has
to be held in memory."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator, Union

from lmlab.errors import LmlabError
from lmlab.io import check_output_file, iter_jsonl, write_jsonl_atomic

Document = dict
Source = Union[Callable[[], Iterable[Document]], Iterable[Document]]


def iterate(source: Source) -> Iterator[Document]:
    """A fresh pass over `source`; refuses one-shot iterators, which a second pass would find empty."""
    if callable(source):
        return iter(source())
    if iter(source) is source:
        raise LmlabError("this step reads its input more than once: pass a list or a function "
                         "returning a fresh iterator (e.g. `lambda: read_documents(path)`), not a generator")
    return iter(source)


def read_documents(path: str | Path, text_field: str = "text") -> Iterator[Document]:
    """Stream documents from `path`. A `.jsonl` file keeps every field of its objects (ids,
    labels, metadata) and needs a string `text_field`; anything else `lmlab.data.sources`
    reads (text files and directories, Parquet, Arrow, a saved HF dataset) gives bare texts.
    Documents without an id get `<file>:<line or index>`."""
    path = Path(path)
    if not path.exists():
        raise LmlabError(f"input not found: {path} (check the path)")
    if path.is_file() and path.suffix == ".jsonl":
        yield from _read_jsonl(path, text_field)
        return
    from lmlab.data.sources import read_texts

    for i, text in enumerate(read_texts(path, text_field), 1):
        yield {"id": f"{path.name}:{i}", "text": text}


def _read_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    for lineno, doc in iter_jsonl(path):  # malformed or non-UTF-8 lines: LmlabError at file:line
        if not isinstance(doc, dict) or not isinstance(doc.get(text_field), str):
            raise LmlabError(f"{path}:{lineno}: expected an object with a string {text_field!r} field")
        if text_field != "text":
            doc["text"] = doc.pop(text_field)
        doc.setdefault("id", f"{path.name}:{lineno}")
        doc["id"] = str(doc["id"])
        yield doc


def write_documents(path: str | Path, docs: Iterable[Document], overwrite: bool = False) -> int:
    """Write documents as JSONL atomically; returns how many were written. An existing
    non-empty file (perhaps the input itself) is refused unless `overwrite`."""
    check_output_file(path, overwrite=overwrite)
    return write_jsonl_atomic(path, docs)
