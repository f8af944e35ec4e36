"""Step 2: exact and near-duplicate removal, order-independent and streaming.

Pass 1 reads the documents once in batches and keeps, per document, only a 64-bit
tie-break key, a 64-bit exact-dedup key and `bands` 32-bit LSH band keys in memory
(16 + 4 x bands bytes: 52 bytes at the default 9 bands); MinHash signatures
(uint32 x num_perm) go to a temporary file, read back only for candidate pairs.
Pass 2 re-reads the source and yields the kept documents.

Which document survives: in every group of duplicates the one with the smallest tie-break
key, blake2b-64(id + NUL + text), is kept. That key depends only on the document itself,
so the kept set is the same for any input order."""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from lmlab.data.curate.documents import Document, Source, iterate
from lmlab.data.curate.minhash import MinHasher, band_keys, estimate_jaccard, lsh_params
from lmlab.data.curate.normalize import dedup_key, hash64
from lmlab.data.curate.report import StepReport
from lmlab.errors import LmlabError

KEEP, EXACT, NEAR = 0, 1, 2


@dataclass(frozen=True)
class DedupConfig:
    exact: bool = True
    near: bool = True
    threshold: float = 0.8      # Jaccard similarity of word n-gram sets counted as a near-duplicate
    ngram: int = 5
    num_perm: int = 128
    bands: int | None = None    # null: chosen from the threshold (see minhash.lsh_params)
    rows: int | None = None
    seed: int = 1
    batch_size: int = 2048

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise LmlabError(f"dedup.threshold must be in (0, 1], got {self.threshold}")
        if (self.bands is None) != (self.rows is None):
            raise LmlabError("dedup.bands and dedup.rows go together: set both, or neither to derive them from the threshold")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise LmlabError(f"dedup.bands x dedup.rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")

    def lsh(self) -> tuple[int, int]:
        return (self.bands, self.rows) if self.bands is not None else lsh_params(self.threshold, self.num_perm)


@dataclass
class DedupPlan:
    reason: np.ndarray          # per input document: KEEP, EXACT or NEAR
    exact_group_sizes: dict[int, int]
    near_cluster_sizes: dict[int, int]
    bands: int
    rows: int
    candidate_pairs: int

    def stats(self) -> dict:
        return {"exact_group_sizes": self.exact_group_sizes, "near_cluster_sizes": self.near_cluster_sizes,
                "lsh_bands": self.bands, "lsh_rows": self.rows, "candidate_pairs": self.candidate_pairs}


def min_labels(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected components of an undirected graph on nodes 0..n-1: each node's label is the
    smallest node in its component (union-find by min-label propagation + pointer jumping)."""
    labels = np.arange(n)
    while True:
        new = labels.copy()
        m = np.minimum(labels[u], labels[v])
        np.minimum.at(new, u, m)
        np.minimum.at(new, v, m)
        while True:  # labels only ever point to smaller nodes, so jumping terminates
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, labels):
            return labels
        labels = new


def _sizes(labels: np.ndarray) -> dict[int, int]:
    _, counts = np.unique(labels, return_counts=True)
    return {int(k): int(v) for k, v in sorted(Counter(counts[counts > 1].tolist()).items())}


def plan_dedup(source: Source, cfg: DedupConfig, workdir: str | Path | None = None) -> DedupPlan:
    """Decide, for each document of `source` (in order), whether it is kept."""
    bands, rows = cfg.lsh()
    hasher = MinHasher(cfg.num_perm, cfg.ngram, cfg.seed) if cfg.near else None
    ties, exact, band_chunks, empty = [], [], [], []   # numpy chunks, one per batch
    with tempfile.TemporaryDirectory(dir=workdir, prefix="lmlab-dedup-") as tmp:
        sig_path = Path(tmp) / "signatures.u32"
        with open(sig_path, "wb") as sig_file:
            batch: list[str] = []
            tie_batch: list[int] = []
            exact_batch: list[int] = []

            def flush() -> None:
                ties.append(np.array(tie_batch, dtype=np.uint64))
                exact.append(np.array(exact_batch, dtype=np.uint64))
                tie_batch.clear()
                exact_batch.clear()
                if hasher is not None and batch:
                    sigs = hasher.signatures(batch)
                    sig_file.write(sigs.tobytes())
                    band_chunks.append(band_keys(sigs, bands, rows))
                    empty.append(sigs[:, 0] == np.uint32(0xFFFFFFFF))
                batch.clear()

            for doc in iterate(source):
                text = doc["text"]
                tie_batch.append(hash64(f"{doc.get('id', '')}\0{text}"))
                exact_batch.append(hash64(dedup_key(text)))
                batch.append(text)
                if len(batch) >= cfg.batch_size:
                    flush()
            flush()
        tie, ex = np.concatenate(ties), np.concatenate(exact)
        n = len(tie)
        reason = np.full(n, KEEP, dtype=np.uint8)
        if n == 0:
            return DedupPlan(reason, {}, {}, bands, rows, 0)
        # rank = position by tie-break key: "smallest rank" is the order-independent survivor.
        order = np.lexsort((ex, tie))
        del tie
        rank = np.empty(n, dtype=np.int32 if n < 2**31 else np.int64)
        rank[order] = np.arange(n, dtype=rank.dtype)
        exact_sizes: dict[int, int] = {}
        if cfg.exact:
            by = np.lexsort((rank, ex))            # groups of equal key, best rank first
            first = np.ones(n, dtype=bool)
            first[1:] = ex[by][1:] != ex[by][:-1]
            reason[by[~first]] = EXACT
            exact_sizes = _sizes(np.cumsum(first))
        del ex
        if not cfg.near:
            return DedupPlan(reason, exact_sizes, {}, bands, rows, 0)
        live = (reason == KEEP) & ~np.concatenate(empty)
        pairs = _candidate_pairs(band_chunks, rank, live)
        band_chunks.clear()
        verified = _verify(sig_path, cfg.num_perm, pairs, cfg.threshold)
        near_sizes: dict[int, int] = {}
        if len(verified):
            nodes, inv = np.unique(rank[verified].ravel(), return_inverse=True)  # rank space
            inv = inv.reshape(-1, 2)
            labels = min_labels(len(nodes), inv[:, 0], inv[:, 1])
            dropped = nodes[labels != np.arange(len(nodes))]
            reason[order[dropped]] = NEAR
            near_sizes = _sizes(labels)
        return DedupPlan(reason, exact_sizes, near_sizes, bands, rows, len(pairs))


def _candidate_pairs(key_chunks: list[np.ndarray], rank: np.ndarray, live: np.ndarray) -> np.ndarray:
    """(m, 2) document indices sharing a band bucket. Each bucket is joined as a star around
    its best-ranked member (not all pairs), so a bucket of k documents costs k - 1 checks.
    Bands are assembled from the per-batch chunks one at a time to keep a single copy."""
    idx = np.flatnonzero(live).astype(rank.dtype)
    out = []
    for i in range(key_chunks[0].shape[1] if key_chunks else 0):
        k = np.concatenate([c[:, i] for c in key_chunks])[idx]
        by = np.lexsort((rank[idx], k))
        ks = k[by]
        new_group = np.ones(len(ks), dtype=bool)
        new_group[1:] = ks[1:] != ks[:-1]
        centre = idx[by][np.flatnonzero(new_group)[np.cumsum(new_group) - 1]]
        member = idx[by]
        m = ~new_group
        if m.any():
            out.append(np.stack([centre[m], member[m]], axis=1))
    if not out:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(out), axis=0)


def _verify(sig_path: Path, num_perm: int, pairs: np.ndarray, threshold: float, chunk: int = 65536) -> np.ndarray:
    """Keep candidate pairs whose estimated Jaccard (signature agreement) reaches the threshold:
    LSH buckets also hold pairs below it. Rows are read with pread rather than a memory map,
    whose touched pages would count towards our resident memory."""
    keep = []
    row = 4 * num_perm
    with open(sig_path, "rb") as f:
        fd = f.fileno()
        for s in range(0, len(pairs), chunk):
            p = pairs[s:s + chunk]
            rows, inv = np.unique(p, return_inverse=True)
            buf = b"".join(os.pread(fd, row, int(r) * row) for r in rows.tolist())
            sig = np.frombuffer(buf, dtype=np.uint32).reshape(len(rows), num_perm)[inv.reshape(-1, 2)]
            keep.append(p[estimate_jaccard(sig[:, 0], sig[:, 1]) >= threshold])
    return np.concatenate(keep) if keep else pairs


def dedup_documents(source: Source, cfg: DedupConfig, step: StepReport,
                    workdir: str | Path | None = None) -> Iterator[Document]:
    """Yield the documents that survive exact and near dedup (reads `source` twice)."""
    plan = plan_dedup(source, cfg, workdir)
    step.extra.update(plan.stats())
    names = {EXACT: "exact_duplicate", NEAR: "near_duplicate"}
    for doc, r in zip(iterate(source), plan.reason.tolist()):
        if r == KEEP:
            step.keep()
            yield doc
        else:
            step.remove(names[r])
