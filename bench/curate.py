"""Throughput and peak memory of exact + MinHash-LSH near dedup on generated short documents,
against datasketch (MinHash + MinHashLSH, query-then-insert) on a prefix of the same stream.

    PYTHONPATH=src python bench/curate.py --docs 1000000 --reference-docs 20000

Documents are 8-30 words from a Zipf-distributed 20k-word vocabulary; 5% are exact copies
and 5% one-word edits of an earlier document in the same block of 10k. The stream is
regenerated for each pass (nothing is held in memory)."""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from lmlab.data.curate import (CleanConfig, DedupConfig, QualityConfig, StepReport, clean_documents, dedup_documents,
                               filter_quality, shingles)

BLOCK = 10_000


def documents(n: int, seed: int = 0):
    vocab = np.array([f"w{i}" for i in range(20_000)])
    for start in range(0, n, BLOCK):
        rng = np.random.default_rng([seed, start])
        m = min(BLOCK, n - start)
        lengths = rng.integers(8, 31, size=m)
        ids = np.minimum(rng.zipf(1.2, size=int(lengths.sum())) - 1, len(vocab) - 1)
        words = vocab[ids]
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        texts = [" ".join(words[offsets[i]:offsets[i + 1]]) for i in range(m)]
        kind = rng.random(m)
        src = rng.integers(0, np.maximum(np.arange(m), 1))
        for i in range(m):
            if i and kind[i] < 0.05:
                texts[i] = texts[src[i]]
            elif i and kind[i] < 0.10:
                ws = texts[src[i]].split()
                ws[rng.integers(len(ws))] = "edited"
                texts[i] = " ".join(ws)
            yield {"id": str(start + i), "text": texts[i]}


def datasketch_dedup(docs, cfg: DedupConfig) -> tuple[set[str], float]:
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    exact, removed = set(), set()
    for d in docs:
        key = " ".join(d["text"].lower().split())
        if key in exact:
            removed.add(d["id"])
            continue
        exact.add(key)
        m = MinHash(num_perm=cfg.num_perm)
        m.update_batch([" ".join(g).encode() for g in shingles(d["text"], cfg.ngram)])
        if lsh.query(m):
            removed.add(d["id"])
        else:
            lsh.insert(d["id"], m)
    return removed, time.perf_counter() - t0


def ours(n: int, cfg: DedupConfig) -> tuple[int, float, StepReport]:
    step = StepReport("dedup")
    t0 = time.perf_counter()
    kept = sum(1 for _ in dedup_documents(lambda: documents(n), cfg, step))
    return n - kept, time.perf_counter() - t0, step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--reference-docs", type=int, default=20_000)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--ngram", type=int, default=3)
    ap.add_argument("--rule-docs", type=int, default=100_000)
    args = ap.parse_args()
    cfg = DedupConfig(threshold=args.threshold, ngram=args.ngram)

    # Ours on the full stream first, so that peak RSS is not inflated by the reference's index.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, secs, step = ours(args.docs, cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for _ in documents(args.docs):
        pass
    gen = time.perf_counter() - t0
    print(f"[{args.docs:,} docs] ours: {secs:.1f} s incl. generating the stream twice ({2 * gen:.1f} s) = "
          f"{args.docs / secs:,.0f} docs/s end to end, {args.docs / (secs - 2 * gen):,.0f} docs/s dedup alone; "
          f"removed {step.removed['exact_duplicate']:,} exact + {step.removed['near_duplicate']:,} near; "
          f"lsh {step.extra['lsh_bands']}x{step.extra['lsh_rows']}; peak RSS {peak / 1024:.0f} MiB "
          f"(after imports {before / 1024:.0f} MiB)")

    n = args.reference_docs
    ref_removed, ref_s = datasketch_dedup(documents(n), cfg)
    our_removed, our_s, _ = ours(n, cfg)
    # End to end on both sides (ours generates the stream twice, datasketch once): the
    # conservative ratio. Which member of a group survives differs (datasketch keeps the
    # first seen, we keep the smallest key), so compare how many documents each removes.
    print(f"[{n:,} docs] datasketch {n / ref_s:,.0f} docs/s, ours {n / our_s:,.0f} docs/s, end to end; "
          f"ours/datasketch speed {ref_s / our_s:.1f}x; removed: datasketch {len(ref_removed):,}, ours {our_removed:,}")

    # Per-document rules on the same stream (the generated text is word salad, so the quality
    # rules are set to keep it: every rule still runs on every document).
    n = args.rule_docs
    t0 = time.perf_counter()
    for _ in documents(n):
        pass
    gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in clean_documents(lambda: documents(n), CleanConfig(), StepReport("clean")):
        pass
    clean_s = time.perf_counter() - t0 - 2 * gen
    t0 = time.perf_counter()
    for _ in filter_quality(documents(n), QualityConfig(min_words=5, min_stop_words=None), StepReport("quality")):
        pass
    quality_s = time.perf_counter() - t0 - gen
    print(f"[{n:,} docs] clean (two passes, boilerplate on) {n / clean_s:,.0f} docs/s, "
          f"quality heuristics {n / quality_s:,.0f} docs/s (generation excluded)")


if __name__ == "__main__":
    main()
