"""One decoder-only transformer, driven entirely by ModelConfig: Llama 2/3, TinyLlama,
Phi-3, Mixtral (MoE FFN) and OpenELM (per-layer widths) are all this module."""
from __future__ import annotations

import math

import torch
from torch import nn

from lmlab.config import ModelConfig
from lmlab.model.attention import Attention
from lmlab.model.cache import KVCache
from lmlab.model.masks import causal_mask, with_key_padding
from lmlab.model.mlp import SwiGLU
from lmlab.model.moe import GroupedLinear, MoE
from lmlab.model.norm import RMSNorm
from lmlab.model.rope import inverse_frequencies, rope_cos_sin


def make_ffn(cfg: ModelConfig, layer: int) -> nn.Module:
    """The feed-forward block of `layer`: dense SwiGLU, or sparse experts (Mixtral)."""
    if cfg.is_moe:
        return MoE(cfg, layer)
    return SwiGLU(cfg.d_model, cfg.layer_ffn(layer), bias=cfg.mlp_bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = make_ffn(cfg, layer)

    def forward(self, x, cos, sin, mask, is_causal, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, is_causal, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """`model(idx)` maps token ids (B, T) to logits (B, T, vocab)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.empty(cfg.dim_per_head // 2), persistent=False)
        # Longrope has a second set of frequencies for positions past the pretraining length.
        is_longrope = cfg.rope_scaling is not None and cfg.rope_scaling.kind == "longrope"
        self.register_buffer("inv_freq_long", torch.empty(cfg.dim_per_head // 2) if is_longrope else None,
                             persistent=False)
        self.reset_parameters()

    # ---- initialisation -------------------------------------------------------------
    def reset_rope(self) -> None:
        """(Re)compute the rotary frequencies; needed after materialising from meta."""
        cfg = self.config
        inv = inverse_frequencies(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling)
        self.inv_freq = inv.to(self.inv_freq.device) if self.inv_freq.device.type != "meta" else inv
        if self.inv_freq_long is not None:
            self.inv_freq_long = inverse_frequencies(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling,
                                                     long=True).to(self.inv_freq.device)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2L)
        so the residual stream's variance does not grow with depth (GPT-2's scheme)."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, GroupedLinear)):
                is_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, 0.0, out_std if is_out else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        if self.inv_freq.device.type != "meta":
            self.reset_rope()

    # ---- caches ---------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> KVCache:
        cfg = self.config
        shapes = [(cfg.layer_kv_heads(i), cfg.dim_per_head) for i in range(cfg.n_layers)]
        param = self.embed.weight
        return KVCache(shapes, batch_size, max_len or cfg.max_seq_len,
                       device=device or param.device, dtype=dtype or param.dtype)

    # ---- forward --------------------------------------------------------------------
    def _mask(self, t: int, cache: KVCache | None, attn_mask: torch.Tensor | None,
              device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for SDPA; picks the fused causal path whenever it is exact."""
        if attn_mask is not None and attn_mask.dim() == 4:
            return attn_mask, False
        offset = cache.length if cache is not None else 0
        window = self.config.sliding_window
        k_len = offset + t
        needs_window = window is not None and k_len > window
        if attn_mask is None and not needs_window:
            if offset == 0:
                return None, True  # plain causal: queries and keys are the same slots
            if t == 1:
                return None, False  # one new token sees every filled slot
        mask = causal_mask(t, k_len, offset, window if needs_window else None, device)
        if attn_mask is not None:
            if attn_mask.shape[-1] != k_len:
                raise ValueError(f"attn_mask covers {attn_mask.shape[-1]} slots, expected {k_len}")
            return with_key_padding(mask, attn_mask.to(device), offset), False
        return mask, False

    def hidden_states(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: KVCache | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, d_model): what LM, reward and value heads read.

        positions: rotary positions, (T,) or (B, T); default: the slots being written.
        cache: a KVCache to read from and append to (decoding).
        attn_mask: (B, S) bool "key slot is valid" over all S = cache.length + T slots
            (left padding), or a full (B, 1, T, S) bool mask used as given (packing).
        """
        b, t = idx.shape
        offset = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(offset, offset + t, device=idx.device)
        x = self.embed(idx)
        cos, sin = rope_cos_sin(positions, self._rope_frequencies(positions), x.dtype,
                                self._rope_attention_factor)
        mask, is_causal = self._mask(t, cache, attn_mask, idx.device)
        for block in self.layers:
            x = block(x, cos, sin, mask, is_causal, cache)
        if cache is not None:
            cache.advance(t)
        return self.norm(x)

    @property
    def _rope_attention_factor(self) -> float:
        scaling = self.config.rope_scaling
        return 1.0 if scaling is None else scaling.attention_factor

    def _rope_frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        """Longrope switches every position of a call to the long factors once any of them
        reaches the pretraining length, as the reference implementation does per forward."""
        if self.inv_freq_long is not None and int(positions.max()) >= self.config.rope_scaling.original_max_seq_len:
            return self.inv_freq_long
        return self.inv_freq

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # Call the head module (not its .weight) so a replaced head, e.g. a quantised one
        # or an adapter-wrapped one, computes the logits itself.
        if self.lm_head is None:
            return nn.functional.linear(hidden, self.embed.weight)
        return self.lm_head(hidden)

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.hidden_states(idx, positions, cache, attn_mask))


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> Transformer:
    with torch.device(device):
        model = Transformer(cfg)
    return model if dtype is None else model.to(dtype)
