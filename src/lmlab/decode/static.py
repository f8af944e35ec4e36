"""A static-shape decoding step for torch.compile.

The eager step attends over the filled prefix of the KV cache, whose length grows by one
per token, and writes the cache at a Python-int slot; compiled with fixed shapes that
would mean a recompilation per token. This step instead writes the new key/value at a slot
given as a tensor and attends over the whole preallocated cache under a (B, 1, 1, S) mask
of valid, already-written slots, so every step has the same shapes and one compiled graph
serves the whole generation. It drives the model's own blocks (no copy of their maths)
and shares the eager cache's storage, so prefill, speculative `extend` and `rollback` stay
eager and mix freely with compiled steps.
"""
from __future__ import annotations

import torch

from lmlab.errors import LmlabError
from lmlab.model.cache import KVCache
from lmlab.model.rope import rope_cos_sin

# Caches are allocated in multiples of this many slots under compile, so that generations
# of nearby lengths share one compiled graph (torch.compile specialises on shapes).
SLOT_BUCKET = 64


class SlotWriter:
    """What an Attention layer sees as its cache inside the static step: it writes this
    step's keys/values at `slot` (a (1,) tensor) and returns the whole buffers."""

    def __init__(self, cache: KVCache, slot: torch.Tensor) -> None:
        self.keys, self.values, self.slot = cache.keys, cache.values, slot

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer].index_copy_(2, self.slot, k)
        self.values[layer].index_copy_(2, self.slot, v)
        return self.keys[layer], self.values[layer]


def static_step(model, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
                valid: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, 1) tokens at rotary `positions` (B, 1), written at cache slot `slot` ((1,)
    tensor); `valid` (B, S) marks slots holding real tokens. Returns (B, V) logits.
    Does not advance the cache: the caller does (outside the compiled graph)."""
    k_slot = torch.arange(valid.shape[1], device=valid.device)
    seen = k_slot <= slot
    if window is not None:
        seen = seen & (k_slot > slot - window)
    mask = (valid & seen)[:, None, None, :]
    x = model.embed(tokens)
    cos, sin = rope_cos_sin(positions, model.inv_freq, x.dtype, model._rope_attention_factor)
    writer = SlotWriter(cache, slot)
    for block in model.layers:
        x = block(x, cos, sin, mask, False, writer)
    return model.logits(model.norm(x))[:, -1]


_compiled = None


def compiled_step():
    """The process-wide compiled `static_step` (compiled lazily, once per shape set)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(static_step, dynamic=False)
    return _compiled


def check_compilable(model) -> None:
    if getattr(model, "inv_freq_long", None) is not None:
        raise LmlabError("compile=True does not support longrope models (their frequencies switch with the "
                         "position, a data-dependent branch); generate with compile=False")
