"""A key/value cache for continuous batching: one row per running sequence, each row
filled from cache slot 0, so a row's slot index *is* its token's rotary position and rows
of different lengths share one forward without any left padding.

The Transformer drives it exactly as it drives `KVCache` (`update` per layer, `advance`
per forward); the batcher says before each forward which rows are written where, and
passes the matching 4-D mask from `prefill_mask` / `decode_mask`.
"""
from __future__ import annotations

import torch


class SlotCache:
    def __init__(self, model, rows: int, max_len: int) -> None:
        cfg = model.config
        param = next(model.parameters())
        self.rows, self.max_len = rows, max_len
        shape = [(cfg.layer_kv_heads(i), cfg.dim_per_head) for i in range(cfg.n_layers)]
        self.keys = [torch.zeros(rows, kv, max_len, hd, device=param.device, dtype=param.dtype)
                     for kv, hd in shape]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.length = 0  # read by Transformer only for default positions; we always pass them
        self._plan: tuple = ("none",)

    # ---- what the next forward writes --------------------------------------------------
    def plan_prefill(self, first_row: int, n_rows: int, width: int) -> None:
        """Rows [first_row, first_row + n_rows) get `width` tokens at slots [0, width)
        (right-padded prompts: slots past a prompt are overwritten by its later tokens)."""
        self._plan = ("prefill", first_row, n_rows, width)

    def plan_decode(self, positions: torch.Tensor) -> None:
        """Rows [0, A) get one token each, row i at slot positions[i]."""
        width = int(positions.max()) + 1
        self._plan = ("decode", positions, torch.arange(positions.numel(), device=positions.device), width)

    # ---- the KVCache protocol the attention layers call ---------------------------------
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer], self.values[layer]
        kind = self._plan[0]
        if kind == "prefill":
            _, a, n, t = self._plan
            keys[a:a + n, :, :t] = k
            values[a:a + n, :, :t] = v
            return keys[a:a + n, :, :t], values[a:a + n, :, :t]
        if kind == "decode":
            _, pos, rows, width = self._plan
            a = rows.numel()
            keys[rows, :, pos] = k[:, :, 0]
            values[rows, :, pos] = v[:, :, 0]
            return keys[:a, :, :width], values[:a, :, :width]
        raise RuntimeError("SlotCache.update called without a plan")

    def advance(self, t: int) -> None:
        pass  # each row's length is the batcher's bookkeeping

    # ---- moving sequences between rows --------------------------------------------------
    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Row `dst` takes row `src`'s first `length` slots (compaction, or n > 1 choices
        sharing one prefilled prompt)."""
        if src == dst or length == 0:
            return
        for keys, values in zip(self.keys, self.values):
            keys[dst, :, :length] = keys[src, :, :length]
            values[dst, :, :length] = values[src, :, :length]


def prefill_mask(n_rows: int, width: int, window: int | None, device) -> torch.Tensor:
    """(n, 1, T, T) causal (and sliding-window) mask: every prefilled row starts at slot 0."""
    q = torch.arange(width, device=device)[:, None]
    k = torch.arange(width, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return allowed.expand(n_rows, 1, width, width)


def decode_mask(positions: torch.Tensor, width: int, window: int | None) -> torch.Tensor:
    """(A, 1, 1, width): row i's new token at slot positions[i] sees slots <= its own."""
    k = torch.arange(width, device=positions.device)[None, :]
    q = positions[:, None]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return allowed[:, None, None, :]
