"""MinHash signatures over word n-gram shingles and the LSH banding that finds candidate
pairs, vectorised in numpy over batches of documents.

Hashing: every word gets a 32-bit CRC; a shingle's hash folds its n word hashes with a
64-bit multiply-add and a splitmix64 finaliser, keeping the top 32 bits. Each of the
`num_perm` hash functions is a multiply-shift hash h(x) = ((a·x + b) mod 2^64) >> 32 with
random 64-bit a, b: a strongly universal family from 32-bit to 32-bit values, cheap in
wrapping uint64 arithmetic (datasketch uses (a·x + b) mod (2^61 - 1) instead). A signature
is the per-function minimum over a document's shingles, stored as uint32 (4 bytes x num_perm
per document); P(sig_i(A) = sig_i(B)) ≈ Jaccard(A, B)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from lmlab.data.curate.normalize import words

_FOLD = np.uint64(0x100000001B3)
_EMPTY = np.uint32(0xFFFFFFFF)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads every input bit over the whole 64-bit word."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingles(text: str, ngram: int) -> set[tuple[str, ...]]:
    """The set of word n-grams of `text` (a document shorter than n is one shingle)."""
    ws = words(text)
    if not ws:
        return set()
    n = min(ngram, len(ws))
    return {tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def shingle_hashes(texts: Sequence[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit shingle hashes of a batch, concatenated, and each document's shingle count."""
    word_lists = [words(t) for t in texts]
    lengths = np.fromiter((len(w) for w in word_lists), dtype=np.int64, count=len(texts))
    flat = np.fromiter((zlib.crc32(w.encode()) for ws in word_lists for w in ws), dtype=np.uint64,
                       count=int(lengths.sum()))
    n_sh = np.where(lengths > 0, np.maximum(lengths - ngram + 1, 1), 0)
    if not n_sh.sum():
        return np.zeros(0, np.uint32), n_sh
    doc_of = np.repeat(np.arange(len(texts)), n_sh)
    word_start = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    first_sh = np.concatenate(([0], np.cumsum(n_sh)[:-1]))
    pos = word_start[doc_of] + (np.arange(len(doc_of)) - first_sh[doc_of])
    width = np.minimum(lengths, ngram)[doc_of]  # short documents: one shingle of all their words
    h = np.zeros(len(pos), np.uint64)
    for k in range(ngram):
        take = k < width
        nxt = flat[np.minimum(pos + k, len(flat) - 1)]
        h = np.where(take, h * _FOLD + nxt, h)
    return (mix64(h) >> np.uint64(32)).astype(np.uint32), n_sh


@dataclass(frozen=True)
class MinHasher:
    num_perm: int = 128
    ngram: int = 5
    seed: int = 1
    a: np.ndarray = field(init=False, repr=False, compare=False)
    b: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        bits = rng.integers(0, 2**63, size=(2, self.num_perm), dtype=np.int64).astype(np.uint64)
        hi = rng.integers(0, 2, size=(2, self.num_perm), dtype=np.int64).astype(np.uint64) << np.uint64(63)
        object.__setattr__(self, "a", (bits[0] | hi[0]) | np.uint64(1))  # odd multiplier
        object.__setattr__(self, "b", bits[1] | hi[1])

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32; a document with no words gets all 0xFFFFFFFF."""
        h, n_sh = shingle_hashes(texts, self.ngram)
        out = np.full((len(texts), self.num_perm), _EMPTY, dtype=np.uint32)
        has = n_sh > 0
        if not has.any():
            return out
        starts = np.concatenate(([0], np.cumsum(n_sh[has])[:-1]))
        x = h.astype(np.uint64)[:, None]
        # Chunks of hash functions bound the (shingles x functions) uint64 temporary.
        step = max(1, (1 << 20) // max(len(h), 1))
        for j in range(0, self.num_perm, step):
            v = ((x * self.a[None, j:j + step] + self.b[None, j:j + step]) >> np.uint64(32)).astype(np.uint32)
            out[has, j:j + step] = np.minimum.reduceat(v, starts, axis=0)
        return out


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Fraction of agreeing hash functions, row-wise."""
    return (sig_a == sig_b).mean(axis=-1)


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """Bands b and rows r (b·r <= num_perm) for an LSH threshold. Two documents of Jaccard s
    share at least one band with probability P(s) = 1 - (1 - s^r)^b, an S-curve whose midpoint
    sits near (1/b)^(1/r). We pick the (b, r) minimising the weighted area of false positives,
    ∫_0^t P(s) ds, plus false negatives, ∫_t^1 1 - P(s) ds (the criterion datasketch uses)."""
    s = np.linspace(0.0, 1.0, 2001)
    lo, hi = s <= threshold, s >= threshold
    best, best_cost = (1, num_perm), np.inf
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - s**r) ** b
            cost = fp_weight * np.trapezoid(p[lo], s[lo]) + fn_weight * np.trapezoid(1.0 - p[hi], s[hi])
            if cost < best_cost:
                best, best_cost = (b, r), cost
    return best


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint32: one hash per band of `rows` signature values; equal keys = candidates.
    32 bits, not 64, halve the memory; the chance collisions they add (about n^2 / 2^33 pairs
    per band) are weeded out by the signature check that follows."""
    out = np.empty((len(sigs), bands), dtype=np.uint32)
    for i in range(bands):
        k = np.full(len(sigs), ((i + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)
        for c in range(i * rows, (i + 1) * rows):
            k = mix64(k ^ sigs[:, c].astype(np.uint64))
        out[:, i] = k >> np.uint64(32)
    return out
