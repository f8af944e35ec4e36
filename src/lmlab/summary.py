"""Parameter counts of a config, computed on the meta device (no memory is allocated)."""
from __future__ import annotations

from typing import Any

from lmlab.config import ModelConfig
from lmlab.model.transformer import build_model, count_parameters


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """total: every parameter; active: those one token passes through (differs for MoE)."""
    model = build_model(cfg, device="meta")
    total = count_parameters(model)
    inactive = 0
    for module in model.modules():
        inactive += getattr(module, "inactive_parameters_per_token", lambda: 0)()
    return {"total": total, "active": total - inactive}


def describe(cfg: ModelConfig) -> dict[str, Any]:
    counts = parameter_counts(cfg)
    return {
        "name": cfg.name, "family": cfg.family, "reference": cfg.reference,
        "parameters": counts["total"], "active_parameters": counts["active"],
        "layers": cfg.n_layers, "d_model": cfg.d_model, "vocab_size": cfg.vocab_size,
        "heads": [cfg.layer_heads(i) for i in range(cfg.n_layers)] if cfg.n_heads_per_layer else cfg.n_heads,
        "kv_heads": [cfg.layer_kv_heads(i) for i in range(cfg.n_layers)]
        if (cfg.n_kv_heads_per_layer or cfg.n_heads_per_layer) else cfg.layer_kv_heads(0),
        "ffn_hidden": [cfg.layer_ffn(i) for i in range(cfg.n_layers)] if cfg.ffn_hidden_per_layer else cfg.ffn_hidden,
        "experts": f"{cfg.top_k} of {cfg.n_experts}" if cfg.is_moe else None,
        "context": cfg.max_seq_len,
    }


def format_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward + backward FLOPs per trained token, the usual 6·N + attention estimate
    (Kaplan et al. 2020; Hoffmann et al. 2022): 6 per active matmul weight, plus
    12·seq_len·(query width) per layer for the score and value products (3× the forward's
    2 + 2 multiply-adds per key, counted over the full window as dense kernels compute it).
    The embedding lookup is no matmul and is left out; a tied output head is a matmul and
    counts. Norms, softmax and the router's top-k are negligible at these widths.
    MoE uses active parameters, so dense and sparse models at equal active size get the
    same figure — the axis the MoE-vs-dense comparison needs."""
    counts = parameter_counts(cfg)
    embedding = cfg.vocab_size * cfg.d_model
    matmul = counts["active"] - (0 if cfg.tie_embeddings else embedding)
    attention = sum(12 * seq_len * cfg.layer_heads(i) * cfg.dim_per_head for i in range(cfg.n_layers))
    return 6 * matmul + attention
