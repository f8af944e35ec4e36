"""Tokenized, packed, memory-mapped training data.

Documents are tokenized in batches (the tokenizer backends use every core), each followed
by EOS, and appended to a per-split token stream. The stream is cut into rows of
`seq_len + 1` tokens where consecutive rows overlap by one token (row i's last target is
row i+1's first input), so no token is ever lost as a target. Rows are written to shard
files as they fill, so memory stays bounded whatever the corpus size.

Directory layout:
    train-00000.bin, ...   raw uint16/uint32 tokens: n_rows * seq_len + 1 per shard
    val-00000.bin, ...
    manifest.json          written last: its presence means the directory is complete

The directory is built beside `out_dir` and swapped in only when complete (`lmlab.io.staged_dir`),
so a bad input, an empty corpus or a crash leaves a previous build untouched, and a
directory holding anything but a previous build is refused unless `overwrite=True`.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from lmlab.errors import LmlabError
from lmlab.io import atomic_path, read_json, staged_dir, write_json_atomic

MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_validation(text: str, val_fraction: float) -> bool:
    """A document's split depends on its content only, so it is stable as a corpus grows."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h < val_fraction * 2**64


class _SplitWriter:
    """Accumulates one split's token stream and writes full shards as they fill."""

    def __init__(self, out_dir: Path, split: str, seq_len: int, rows_per_shard: int, dtype: np.dtype) -> None:
        self.out_dir, self.split, self.seq_len = out_dir, split, seq_len
        self.rows_per_shard, self.dtype = rows_per_shard, dtype
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []
        self.documents = 0
        self.tokens = 0

    def add(self, ids: list[int]) -> None:
        self.buffer.append(np.asarray(ids, dtype=self.dtype))
        self.buffered += len(ids)
        self.documents += 1
        self.tokens += len(ids)
        while self.buffered >= self.rows_per_shard * self.seq_len + 1:
            self._flush(self.rows_per_shard)

    def _flush(self, rows: int) -> None:
        stream = np.concatenate(self.buffer)
        n = rows * self.seq_len + 1
        name = f"{self.split}-{len(self.shards):05d}.bin"
        with atomic_path(self.out_dir / name) as tmp:
            stream[:n].tofile(tmp)
        self.shards.append({"file": name, "rows": rows})
        rest = stream[n - 1:]  # the last token is also the next shard's first input
        self.buffer, self.buffered = [rest], len(rest)

    def finish(self) -> int:
        """Write the remaining whole rows; return the number of tokens that fit no row."""
        rows = (self.buffered - 1) // self.seq_len if self.buffered > 1 else 0
        if rows:
            self._flush(rows)
        dropped = max(self.buffered - 1, 0) if self.shards else self.buffered
        self.buffer, self.buffered = [], 0
        return dropped


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def previous_build(out_dir: Path) -> list[str]:
    """The entries of `out_dir` a finished shard build wrote: its manifest and the shards it lists."""
    try:
        manifest = read_json(out_dir / MANIFEST, "")
        if not isinstance(manifest, dict) or manifest.get("format") != "lmlab-shards":
            return []
        return [MANIFEST] + [s["file"] for split in manifest["splits"].values() for s in split["shards"]]
    except (LmlabError, KeyError, TypeError, AttributeError):
        return []


def build_shards(source, tokenizer, out_dir: str | Path, seq_len: int, val_fraction: float = 0.01,
                 text_field: str = "text", rows_per_shard: int = 8192, batch_docs: int = 256,
                 progress: bool = True, overwrite: bool = False) -> dict:
    """Tokenize `source` (a path, or an iterable of documents) into shards in `out_dir`.

    Blank (empty or whitespace-only) documents are skipped. Returns the manifest. Raises
    LmlabError, leaving `out_dir` as it was, for a corpus with no text or one too small to
    fill a single training row of `seq_len + 1` tokens, and for an `out_dir` that holds
    anything but a previous shard build (unless `overwrite`: then only the files of this
    build and of the previous one are replaced, others are kept)."""
    from lmlab.data.sources import read_texts

    if seq_len < 1:
        raise LmlabError(f"seq_len must be at least 1, got {seq_len}")
    if not 0 <= val_fraction < 1:
        raise LmlabError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if tokenizer.eos_id is None:
        raise LmlabError("the tokenizer has no EOS token, which separates documents in shards; use one that has")
    inputs = [source] if isinstance(source, (str, os.PathLike)) else []
    with staged_dir(out_dir, overwrite=overwrite, owned=previous_build, marker=MANIFEST, inputs=inputs,
                    what="shard directory") as staging:
        texts = read_texts(source, text_field) if inputs else source
        return _build(texts, tokenizer, staging, seq_len, val_fraction, rows_per_shard, batch_docs, progress)


def _build(texts, tokenizer, out_dir: Path, seq_len: int, val_fraction: float, rows_per_shard: int,
           batch_docs: int, progress: bool) -> dict:
    from tqdm import tqdm

    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: _SplitWriter(out_dir, s, seq_len, rows_per_shard, dtype) for s in SPLITS}
    blank = 0

    def nonblank(docs):
        nonlocal blank
        for t in docs:
            if not isinstance(t, str):
                raise LmlabError(f"a document is {type(t).__name__}, not text; give strings (or a path)")
            if t.strip():
                yield t
            else:
                blank += 1

    texts = nonblank(texts)
    start = time.perf_counter()
    bar = tqdm(desc="tokenizing", unit=" docs", disable=not progress)
    eos = tokenizer.eos_id
    for batch in _batches(texts, batch_docs):
        for text, ids in zip(batch, tokenizer.encode_batch(batch)):
            writers["val" if is_validation(text, val_fraction) else "train"].add(ids + [eos])
        bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - start
    total_docs = sum(w.documents for w in writers.values())
    if total_docs == 0:
        found = f"only {blank} blank (empty or whitespace-only) documents" if blank else "no documents"
        raise LmlabError(f"the corpus is empty: {found} were found; check the data path and text_field")
    dropped = {s: w.finish() for s, w in writers.items()}
    if not writers["train"].shards:
        raise LmlabError(
            f"the corpus has {writers['train'].tokens} training tokens, fewer than one row of "
            f"seq_len + 1 = {seq_len + 1}; add data or lower seq_len"
        )
    tokens = sum(w.tokens for w in writers.values())
    manifest = {
        "format": "lmlab-shards", "version": 1, "seq_len": seq_len, "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size, "eos_id": eos, "val_fraction": val_fraction,
        "splits": {
            s: {"shards": w.shards, "rows": sum(x["rows"] for x in w.shards), "documents": w.documents,
                "tokens": w.tokens, "dropped_tokens": dropped[s]}
            for s, w in writers.items()
        },
        "blank_documents_skipped": blank,
        "tokenize_seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds) if seconds > 0 else None,
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


class ShardDataset(torch.utils.data.Dataset):
    """Row i of a split: a LongTensor of seq_len + 1 tokens (inputs [:-1], targets [1:])."""

    def __init__(self, directory: str | Path, split: str = "train") -> None:
        directory = Path(directory)
        path = directory / MANIFEST
        manifest = read_json(path, "the shards are missing or were never finished; (re)build them with `lmlab shards`")
        if split not in manifest["splits"]:
            raise LmlabError(f"unknown split {split!r}; choose one of {list(manifest['splits'])}")
        self.manifest = manifest
        self.seq_len = manifest["seq_len"]
        self.vocab_size = manifest["vocab_size"]
        dtype = np.dtype(manifest["dtype"])
        self.arrays = [np.memmap(directory / s["file"], dtype=dtype, mode="r") for s in manifest["splits"][split]["shards"]]
        self.offsets = np.cumsum([0] + [s["rows"] for s in manifest["splits"][split]["shards"]])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        shard = int(np.searchsorted(self.offsets, i, side="right") - 1)
        row = i - int(self.offsets[shard])
        start = row * self.seq_len
        return torch.from_numpy(self.arrays[shard][start:start + self.seq_len + 1].astype(np.int64))
