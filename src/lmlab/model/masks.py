"""Boolean attention masks (True = may attend), as pure functions of shapes and ids.

Queries and keys are addressed by *slot*: the index in the key/value sequence, which is the
KV-cache index during decoding. Per-row rotary positions are separate (see `positions`).
"""
from __future__ import annotations

import torch


def causal_mask(q_len: int, k_len: int, q_offset: int = 0, window: int | None = None,
                device: torch.device | None = None) -> torch.Tensor:
    """(q_len, k_len): query i sits at slot q_offset + i and sees keys at slots <= its own
    (and, with a sliding window, only the last `window` of them, itself included)."""
    q_slot = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
    k_slot = torch.arange(k_len, device=device)[None, :]
    allowed = k_slot <= q_slot
    if window is not None:
        allowed &= k_slot > q_slot - window
    return allowed


def with_key_padding(mask: torch.Tensor, key_valid: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
    """Combine a (T, S) causal mask with a (B, S) key-validity mask into (B, 1, T, S).

    Every query may still attend to its own slot: a padding query would otherwise see no key
    at all and produce NaN, which would leak into valid rows through 0 * NaN."""
    q_len, k_len = mask.shape
    combined = mask[None] & key_valid[:, None, :].bool()
    own = torch.arange(q_len, device=mask.device)
    combined[:, own, own + q_offset] = True
    return combined[:, None]


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids of packed sequences -> (B, 1, T, T): causal within a document,
    nothing across documents."""
    t = doc_ids.shape[-1]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    return (same_doc & causal)[:, None]


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Rotary positions that restart at 0 at the start of every document in a pack."""
    b, t = doc_ids.shape
    idx = torch.arange(t, device=doc_ids.device).expand(b, t)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx
