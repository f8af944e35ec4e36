"""Step 4: weighted mixtures. Each draw picks a source with probability proportional to its
weight among the sources not yet exhausted, so the stream matches the weights until a source
runs out of epochs; then the remaining weights are renormalised. Sources are factories (any
zero-argument callable returning an iterator of documents or strings), so a synthetic
generator such as a `lmlab.worlds` task is a source like any file."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from lmlab.data.curate.documents import Document
from lmlab.errors import LmlabError


@dataclass(frozen=True)
class MixtureSource:
    name: str
    factory: Callable[[], Iterable[Document | str]]
    weight: float = 1.0
    epochs: int | None = 1      # passes over the source; None = endless (generators)

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise LmlabError(f"mixture source {self.name!r}: weight must be > 0, got {self.weight}")
        if self.epochs is not None and self.epochs < 1:
            raise LmlabError(f"mixture source {self.name!r}: epochs must be >= 1 or null (endless), got {self.epochs}")


class _Cursor:
    def __init__(self, src: MixtureSource):
        self.src, self.epoch, self.count, self.it = src, 0, 0, iter(src.factory())

    def next(self) -> Document | None:
        while True:
            try:
                item = next(self.it)
            except StopIteration:
                self.epoch += 1
                if self.count == 0 or (self.src.epochs is not None and self.epoch >= self.src.epochs):
                    return None  # an empty source would loop forever
                self.it = iter(self.src.factory())
                continue
            self.count += 1
            doc = {"text": item} if isinstance(item, str) else dict(item)
            doc.setdefault("id", f"{self.src.name}:{self.count}")
            return {**doc, "source": self.src.name, "epoch": self.epoch}


def mix(sources: list[MixtureSource], seed: int = 0, max_docs: int | None = None) -> Iterator[Document]:
    """Deterministic from `seed`; ends when every source is exhausted or after `max_docs`."""
    if not sources:
        raise LmlabError("a mixture needs at least one source")
    if len({s.name for s in sources}) != len(sources):
        raise LmlabError("mixture source names must be unique")
    if max_docs is None and any(s.epochs is None for s in sources):
        raise LmlabError("a mixture with an endless source needs max_docs")
    rng = np.random.default_rng(seed)
    cursors = [_Cursor(s) for s in sources]
    weights = np.array([s.weight for s in sources], dtype=np.float64)
    n = 0
    while cursors and (max_docs is None or n < max_docs):
        i = int(rng.choice(len(cursors), p=weights / weights.sum()))
        doc = cursors[i].next()
        if doc is None:
            del cursors[i]
            weights = np.delete(weights, i)
            continue
        n += 1
        yield doc
