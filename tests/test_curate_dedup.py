"""MinHash/LSH and dedup against exact Jaccard, datasketch, and hand-built duplicate sets."""
import random

import numpy as np
import pytest
from datasketch import MinHash
from datasketch.lsh import _optimal_param

from lmlab.data.curate import DedupConfig, MinHasher, StepReport, dedup_documents, estimate_jaccard, jaccard, lsh_params, shingles
from lmlab.data.curate.dedup import min_labels


def tokens(prefix, n):
    return [f"{prefix}{i}" for i in range(n)]


def pair_with_jaccard(tag, m, k):
    """Two word-unigram sets of size m sharing k words: Jaccard = k / (2m - k) exactly."""
    shared = tokens(f"s{tag}x", k)
    a = " ".join(shared + tokens(f"a{tag}x", m - k))
    b = " ".join(tokens(f"b{tag}x", m - k) + shared)
    return a, b


def test_pair_construction_has_the_stated_jaccard():
    a, b = pair_with_jaccard(0, 100, 90)
    assert jaccard(shingles(a, 1), shingles(b, 1)) == pytest.approx(90 / 110)


def test_lsh_params_match_datasketch():
    for t in (0.3, 0.5, 0.8, 0.9):
        assert lsh_params(t, 128) == _optimal_param(t, 128, 0.5, 0.5)


def test_minhash_estimates_match_exact_jaccard_and_datasketch():
    hasher = MinHasher(num_perm=256, ngram=3, seed=7)
    rng = random.Random(0)
    ours, theirs, exact = [], [], []
    for t in range(40):
        vocab = [f"w{t}_{i}" for i in range(60)]
        a = " ".join(rng.choice(vocab) for _ in range(80))
        b = " ".join(rng.choice(vocab) if rng.random() < 0.01 + 0.3 * t / 40 else w for w in a.split())
        sa, sb = shingles(a, 3), shingles(b, 3)
        sig = hasher.signatures([a, b])
        ours.append(float(estimate_jaccard(sig[0], sig[1])))
        ds = [MinHash(num_perm=256, seed=t) for _ in range(2)]
        for m, s in zip(ds, (sa, sb)):
            m.update_batch([" ".join(g).encode() for g in s])
        theirs.append(ds[0].jaccard(ds[1]))
        exact.append(jaccard(sa, sb))
    exact, ours, theirs = map(np.array, (exact, ours, theirs))
    sd = np.sqrt(exact * (1 - exact) / 256) + 1e-3
    assert exact.min() < 0.3 and exact.max() > 0.5  # a spread of similarities
    assert np.all(np.abs(ours - exact) < 4 * sd)
    assert np.all(np.abs(theirs - exact) < 4 * sd)
    # unbiased: the mean error is within sampling error of zero, as datasketch's is
    assert abs(np.mean(ours - exact)) < 3 * np.sqrt(np.mean(sd**2) / len(exact))
    assert np.mean(np.abs(ours - exact)) < 1.5 * np.mean(np.abs(theirs - exact)) + 0.01


def test_near_duplicates_caught_above_threshold_and_kept_below():
    docs = []
    for t in range(10):
        a, b = pair_with_jaccard(t, 100, 98)        # J = 98/102 ≈ 0.96 > 0.8
        docs += [{"id": f"hi{t}a", "text": a}, {"id": f"hi{t}b", "text": b}]
        a, b = pair_with_jaccard(t + 100, 100, 70)  # J = 70/130 ≈ 0.54 < 0.8
        docs += [{"id": f"lo{t}a", "text": a}, {"id": f"lo{t}b", "text": b}]
    step = StepReport("dedup")
    kept = {d["id"] for d in dedup_documents(docs, DedupConfig(threshold=0.8, ngram=1), step)}
    for t in range(10):
        assert len(kept & {f"hi{t}a", f"hi{t}b"}) == 1, t
        assert {f"lo{t}a", f"lo{t}b"} <= kept, t
    assert step.removed["near_duplicate"] == 10
    assert step.extra["near_cluster_sizes"] == {2: 10}
    step.check()


def test_near_dedup_with_word_ngrams_follows_threshold():
    # n-gram shingles: B = A with its last q words replaced; shared 5-grams = L - q - 4.
    a_words = tokens("t", 200)
    docs = []
    for q, tag in ((3, "close"), (60, "far")):
        b_words = a_words[:-q] + tokens(f"r{tag}", q)
        j = jaccard(shingles(" ".join(a_words), 5), shingles(" ".join(b_words), 5))
        assert j == pytest.approx((196 - q) / (196 + q))
        docs.append({"id": tag, "text": " ".join(b_words)})
    docs.append({"id": "orig", "text": " ".join(a_words)})
    kept = {d["id"] for d in dedup_documents(docs, DedupConfig(threshold=0.8, ngram=5), StepReport("d"))}
    assert "far" in kept and len(kept & {"close", "orig"}) == 1


def test_exact_dedup_is_order_independent_and_normalised():
    base = ["Hello world, this is a test.", "Another document here.", "A third one!"]
    docs = []
    for i, t in enumerate(base * 3):
        variant = [t, t.upper(), "  " + t.replace(" ", "   ")][i // 3]
        docs.append({"id": f"d{i}", "text": variant})
    cfg = DedupConfig(near=False)
    kept_sets = set()
    for seed in range(6):
        shuffled = docs[:]
        random.Random(seed).shuffle(shuffled)
        step = StepReport("dedup")
        kept_sets.add(frozenset(d["id"] for d in dedup_documents(shuffled, cfg, step)))
        assert step.kept == 3 and step.removed["exact_duplicate"] == 6
        assert step.extra["exact_group_sizes"] == {3: 3}
    assert len(kept_sets) == 1


def test_near_dedup_is_order_independent():
    rng = random.Random(1)
    words = tokens("v", 40)
    base = [[rng.choice(words) for _ in range(60)] for _ in range(8)]
    docs = []
    for i, ws in enumerate(base):
        for j in range(4):  # chains of small edits: clusters whose members differ pairwise
            ws = ws[:]
            ws[rng.randrange(60)] = f"edit{i}_{j}"
            docs.append({"id": f"{i}-{j}", "text": " ".join(ws)})
    cfg = DedupConfig(threshold=0.7, ngram=2)
    results = set()
    for seed in range(5):
        shuffled = docs[:]
        random.Random(seed).shuffle(shuffled)
        results.add(frozenset(d["id"] for d in dedup_documents(shuffled, cfg, StepReport("d"))))
    assert len(results) == 1
    assert len(next(iter(results))) < len(docs)


def test_min_labels_matches_a_plain_union_find():
    rng = np.random.default_rng(0)
    n = 200
    u, v = rng.integers(0, n, 150), rng.integers(0, n, 150)
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in zip(u.tolist(), v.tolist()):
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    assert min_labels(n, u, v).tolist() == [find(i) for i in range(n)]


def test_one_shot_generator_is_refused():
    from lmlab.errors import LmlabError

    with pytest.raises(LmlabError, match="more than once"):
        list(dedup_documents((d for d in [{"id": "a", "text": "x"}]), DedupConfig(), StepReport("d")))


def test_shingle_hashes_respect_word_order_and_count():
    from lmlab.data.curate.minhash import shingle_hashes

    a = " ".join(tokens("o", 30))
    b = " ".join(reversed(a.split()))  # same words, no 3-gram in common
    assert jaccard(shingles(a, 3), shingles(b, 3)) == 0.0
    sig = MinHasher(num_perm=128, ngram=3).signatures([a, b])
    assert estimate_jaccard(sig[0], sig[1]) < 0.05
    h, counts = shingle_hashes([a, "one two", "", b], 3)
    assert counts.tolist() == [28, 1, 0, 28] and len(set(h[:28].tolist())) == 28
