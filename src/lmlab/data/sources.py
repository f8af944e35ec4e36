"""Read documents from the formats users have: text files and directories, JSONL, Parquet,
and a Hugging Face `datasets` directory saved with `save_to_disk`. Everything streams:
documents are yielded one at a time, never collected."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lmlab.errors import LmlabError
from lmlab.io import iter_jsonl, os_errors, read_json

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
# A big plain-text file is cut at a blank line once a document reaches this size, so that
# one file larger than memory still streams.
MAX_TEXT_DOC_CHARS = 1 << 20


def _read_text_file(path: Path) -> Iterator[str]:
    parts: list[str] = []
    size = 0
    # Undecodable bytes become U+FFFD: plain text is read leniently, like most tools do.
    with os_errors(path, "read"), open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts.append(line)
            size += len(line)
            if size >= MAX_TEXT_DOC_CHARS and not line.strip():
                yield "".join(parts)
                parts, size = [], 0
    if parts:
        yield "".join(parts)


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for lineno, record in iter_jsonl(path):  # malformed, truncated or non-UTF-8: file:line
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise LmlabError(
                f"{path}:{lineno}: no field {text_field!r} (found {keys}); "
                "set data.text_field to the field holding the text"
            )
        value = record[text_field]
        if not isinstance(value, str):
            raise LmlabError(f"{path}:{lineno}: field {text_field!r} is {type(value).__name__}, not text")
        yield value


@contextmanager
def _arrow_errors(path: Path, kind: str) -> Iterator[None]:
    """pyarrow's errors (bad magic bytes, a truncated footer, corrupt pages) name no fix."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError) as e:
        raise LmlabError(f"{path}: not a readable {kind} file ({e}); re-export it or remove it from the data") from None


def _column(table, path: Path, text_field: str):
    if text_field not in table.column_names:
        raise LmlabError(
            f"{path}: no column {text_field!r} (columns: {table.column_names}); set data.text_field"
        )
    return table.column(text_field)


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    with _arrow_errors(path, "Parquet"):
        reader = pq.ParquetFile(path)
        if text_field not in reader.schema_arrow.names:
            raise LmlabError(f"{path}: no column {text_field!r} (columns: {reader.schema_arrow.names}); "
                             "set data.text_field")
        for batch in reader.iter_batches(columns=[text_field], batch_size=4096):
            for t in batch.column(0).to_pylist():
                if t is not None and not isinstance(t, str):
                    raise LmlabError(f"{path}: column {text_field!r} holds {type(t).__name__}, not text")
                if t is not None:
                    yield t


def _read_arrow(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa

    with _arrow_errors(path, "Arrow"), pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
        batches = reader if hasattr(reader, "__iter__") else (reader.get_batch(i) for i in range(reader.num_record_batches))
        for batch in batches:
            yield from (t for t in _column(batch, path, text_field).to_pylist() if t is not None)


def is_hf_datasets_dir(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").is_file() and any(path.glob("*.arrow"))


def read_texts(source: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents under `source` (a file or a directory, read in sorted order)."""
    path = Path(source)
    if not path.exists():
        raise LmlabError(f"data path does not exist: {path}")
    if is_hf_datasets_dir(path):
        state = read_json(path / "state.json", "a datasets directory saved with save_to_disk has one")
        files = [path / f["filename"] for f in state.get("_data_files", [])] or sorted(path.glob("*.arrow"))
        for f in files:
            yield from _read_arrow(f, text_field)
        return
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ".jsonl":
            yield from _read_jsonl(f, text_field)
        elif suffix == ".parquet":
            yield from _read_parquet(f, text_field)
        elif suffix == ".arrow":
            yield from _read_arrow(f, text_field)
        elif suffix in TEXT_SUFFIXES or not path.is_dir():
            yield from _read_text_file(f)
