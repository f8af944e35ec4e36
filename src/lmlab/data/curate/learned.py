"""Step 3b, applying a trained quality classifier: keep documents above a score threshold or
the best-scoring fraction. Needs only the classifier's `scores(texts)`, not torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from lmlab.data.curate.documents import Document, Source, iterate
from lmlab.data.curate.report import StepReport
from lmlab.errors import LmlabError


@dataclass(frozen=True)
class LearnedFilterConfig:
    model: str | None = None               # path to a saved classifier; null switches the filter off
    threshold: float | None = None          # keep P(good) >= threshold (0.5 when neither is set) ...
    keep_top_fraction: float | None = None  # ... or the best-scoring fraction (then reads the input twice)
    batch_size: int = 1024

    def __post_init__(self) -> None:
        if self.threshold is not None and self.keep_top_fraction is not None:
            raise LmlabError("learned filter: set threshold or keep_top_fraction, not both")
        if self.keep_top_fraction is not None and not 0.0 < self.keep_top_fraction <= 1.0:
            raise LmlabError(f"learned.keep_top_fraction must be in (0, 1], got {self.keep_top_fraction}")


def _batched_scores(clf, docs, batch_size: int) -> Iterator[tuple[Document, float]]:
    batch: list[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == batch_size:
            yield from zip(batch, clf.scores([d["text"] for d in batch]).tolist())
            batch = []
    if batch:
        yield from zip(batch, clf.scores([d["text"] for d in batch]).tolist())


def filter_learned(source: Source, clf, cfg: LearnedFilterConfig, step: StepReport) -> Iterator[Document]:
    """Keep documents by classifier score; the score is stored in the document as `quality`."""
    if cfg.keep_top_fraction is not None:
        scores = np.array([s for _, s in _batched_scores(clf, iterate(source), cfg.batch_size)], dtype=np.float64)
        k = int(round(cfg.keep_top_fraction * len(scores)))
        keep = np.zeros(len(scores), dtype=bool)
        keep[np.argsort(-scores, kind="stable")[:k]] = True  # ties: earlier document first
        pairs = zip(iterate(source), keep.tolist(), scores.tolist())
    else:
        threshold = 0.5 if cfg.threshold is None else cfg.threshold
        pairs = ((d, s >= threshold, s) for d, s in _batched_scores(clf, iterate(source), cfg.batch_size))
    for doc, ok, score in pairs:
        if ok:
            step.keep()
            yield {**doc, "quality": round(float(score), 6)}
        else:
            step.remove("low_classifier_score")
