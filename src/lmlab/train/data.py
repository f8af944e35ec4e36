"""Resumable batch sources for the training loop.

The loop asks a source for `n` examples at a time (`next_batch(n)`) and stores
`state_dict()` in each checkpoint, so a resumed run sees exactly the examples the
uninterrupted run would have seen. Examples are drawn sequence by sequence from a
per-epoch permutation, so the order does not depend on the micro-batch size: accumulating
4 x 2 sees the same 8 sequences as one batch of 8. Sharded over ranks (`shard`), each rank
takes its contiguous slice of every global batch of the same permutation, so the ranks
together see exactly the sequences one process would.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from lmlab.errors import LmlabError


def stack(examples: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(examples)


class ShuffledBatches:
    """Endless batches from an indexable dataset (e.g. `ShardDataset`), reshuffled each epoch."""

    def __init__(self, dataset: Sequence[Any], seed: int = 0, shuffle: bool = True,
                 collate: Callable[[list[Any]], Any] = stack) -> None:
        if len(dataset) == 0:
            raise LmlabError("the training dataset is empty: give more text or a shorter seq_len")
        self.dataset, self.seed, self.shuffle, self.collate = dataset, seed, shuffle, collate
        self.position = 0  # examples consumed since the start of training (by all ranks)
        self.rank, self.world_size = 0, 1
        self._epoch, self._order = -1, None

    def shard(self, rank: int, world_size: int) -> "ShuffledBatches":
        """This source as rank `rank` of `world_size` sees it: `next_batch(n)` returns its
        n / world_size examples of the global batch of n; the position stays global."""
        shard = ShuffledBatches(self.dataset, self.seed, self.shuffle, self.collate)
        shard.position, shard.rank, shard.world_size = self.position, rank, world_size
        return shard

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dataset))
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order, self._epoch = torch.randperm(len(self.dataset), generator=g), epoch
        return int(self._order[offset])

    def next_batch(self, n: int) -> Any:
        share, rest = divmod(n, self.world_size)
        if rest or share == 0:
            raise LmlabError(f"a batch of {n} cannot be split over {self.world_size} ranks: make "
                             "train.micro_batch_size a multiple of the number of processes")
        first = self.position + self.rank * share
        items = [self.dataset[self._index(first + i)] for i in range(share)]
        self.position += n
        return self.collate(items)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


class FixedBatches:
    """The first `n_batches` batches of a dataset in order: a stable validation set."""

    def __init__(self, dataset: Sequence[Any], batch_size: int, n_batches: int,
                 collate: Callable[[list[Any]], Any] = stack) -> None:
        n = min(len(dataset), batch_size * n_batches)
        self.batches = [collate([dataset[i] for i in range(s, min(n, s + batch_size))])
                        for s in range(0, n, batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
