"""Grouped-query self-attention through torch's fused scaled_dot_product_attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ModelConfig
from lmlab.model.cache import KVCache
from lmlab.model.norm import RMSNorm
from lmlab.model.rope import apply_rope


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = cfg.layer_heads(layer)
        self.n_kv_heads = cfg.layer_kv_heads(layer)
        self.head_dim = cfg.dim_per_head
        d, hd = cfg.d_model, self.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=cfg.attn_out_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps)
            self.k_norm = RMSNorm(hd, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, is_causal: bool, cache: KVCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
