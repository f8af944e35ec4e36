"""A preallocated key/value cache: decoding writes into it in place and reads views of it,
so no step rebuilds or copies the cache."""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, shapes: list[tuple[int, int]], batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        """`shapes` holds (n_kv_heads, head_dim) for each layer (they may differ by layer)."""
        self.max_len = max_len
        self.batch_size = batch_size
        self.keys = [torch.zeros(batch_size, kv, max_len, hd, device=device, dtype=dtype) for kv, hd in shapes]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.length = 0  # slots filled; a forward writes at [length, length + T)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values for `layer`; return views of every filled slot."""
        start, t = self.length, k.shape[2]
        end = start + t
        if end > self.max_len:
            from lmlab.errors import LmlabError

            raise LmlabError(
                f"KV cache is full: {end} tokens needed, {self.max_len} allocated; "
                "allocate a larger cache (max_len) or generate fewer tokens"
            )
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, t: int) -> None:
        self.length += t

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on (speculative decoding rolls back this way)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (in that order), e.g. to drop finished sequences from a batch."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.batch_size = int(index.numel())
