"""Noise injection for the curation experiment: starting from clean documents, add exact
and near duplicates, shared boilerplate lines, word-shuffled documents and random-character
documents, each labelled in `noise` so a curation run can be scored against the truth."""
from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

from lmlab.data.curate.documents import Document

BOILERPLATE = ("Accept all cookies to continue browsing this website.",
               "Copyright 2024 Example Media Group. All rights reserved.",
               "Subscribe to our newsletter for the latest updates!")


@dataclass(frozen=True)
class NoiseConfig:
    duplicate_fraction: float = 0.2      # extra copies (half exact, half with one word changed)
    boilerplate_fraction: float = 0.3    # clean documents that get boilerplate lines added
    shuffled_fraction: float = 0.1       # word-shuffled copies of clean documents
    random_fraction: float = 0.1         # random-character documents
    seed: int = 0


def _random_doc(rng: np.random.Generator, n_chars: int) -> str:
    alphabet = np.array(list(string.ascii_letters + string.digits + string.punctuation + "     "))
    return "".join(rng.choice(alphabet, size=max(n_chars, 20)))


def inject_noise(texts: list[str], cfg: NoiseConfig = NoiseConfig()) -> list[Document]:
    """Clean documents (noise "clean" or "boilerplate") plus added noise, shuffled together.
    Fractions are relative to the number of clean documents."""
    rng = np.random.default_rng(cfg.seed)
    n = len(texts)
    docs: list[Document] = []
    boiler = set(rng.choice(n, size=int(cfg.boilerplate_fraction * n), replace=False).tolist()) if n else set()
    for i, t in enumerate(texts):
        if i in boiler:
            head, tail = BOILERPLATE[i % 3], BOILERPLATE[(i + 1) % 3]
            docs.append({"id": f"clean-{i}", "text": f"{head}\n{t}\n{tail}", "noise": "boilerplate"})
        else:
            docs.append({"id": f"clean-{i}", "text": t, "noise": "clean"})
    for k, i in enumerate(rng.integers(0, n, size=int(cfg.duplicate_fraction * n)).tolist()):
        ws = texts[i].split()
        if k % 2 and len(ws) > 1:
            j = int(rng.integers(len(ws)))
            ws[j] = ws[j] + "s"
            docs.append({"id": f"near-{k}", "text": " ".join(ws), "noise": "near_duplicate"})
        else:
            docs.append({"id": f"dup-{k}", "text": texts[i], "noise": "exact_duplicate"})
    for k, i in enumerate(rng.integers(0, n, size=int(cfg.shuffled_fraction * n)).tolist()):
        ws = texts[i].split()
        docs.append({"id": f"shuf-{k}", "text": " ".join(ws[j] for j in rng.permutation(len(ws))), "noise": "shuffled"})
    for k, i in enumerate(rng.integers(0, n, size=int(cfg.random_fraction * n)).tolist()):
        docs.append({"id": f"rand-{k}", "text": _random_doc(rng, len(texts[i])), "noise": "random_chars"})
    return [docs[j] for j in rng.permutation(len(docs))]


def removal_by_label(before: list[Document], after_ids: set[str]) -> dict[str, dict[str, float]]:
    """Per noise label: how many documents went in, how many survived, the removed fraction.
    (Of a duplicate pair either copy may survive, so 'exact_duplicate' alone does not reach 1.)"""
    table: dict[str, dict[str, float]] = {}
    for doc in before:
        row = table.setdefault(doc["noise"], {"input": 0, "kept": 0})
        row["input"] += 1
        row["kept"] += doc["id"] in after_ids
    for row in table.values():
        row["removed_fraction"] = round(1 - row["kept"] / row["input"], 4)
    return dict(sorted(table.items()))
