"""Apple's OpenELM checkpoints (`OpenELMForCausalLM`, model_type "openelm"): per-layer head
counts and FFN widths (layer-wise scaling), a fused `qkv_proj`, RMSNorm on queries and keys,
a fused GLU `proj_1` (gate rows, then up rows) and `proj_2`, and usually shared input/output
embeddings. Import splits the fused weights; export fuses them back.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from lmlab.config import ModelConfig, layerwise_scaling, make_divisible
from lmlab.errors import LmlabError
from lmlab.interop.hf import (
    Family, HFCheckpoint, KeyMap, Tensors, check_exportable, config_from_fields, register_family,
    renamed_from_hf, renamed_to_hf, require,
)

KEYS = KeyMap([
    ("embed", "transformer.token_embeddings"),
    ("layers.{i}.attn_norm", "transformer.layers.{i}.attn_norm"),
    ("layers.{i}.attn.q_norm", "transformer.layers.{i}.attn.q_norm"),
    ("layers.{i}.attn.k_norm", "transformer.layers.{i}.attn.k_norm"),
    ("layers.{i}.attn.o_proj", "transformer.layers.{i}.attn.out_proj"),
    ("layers.{i}.mlp_norm", "transformer.layers.{i}.ffn_norm"),
    ("layers.{i}.mlp.down_proj", "transformer.layers.{i}.ffn.proj_2"),
    ("norm", "transformer.norm"),
    ("lm_head", "lm_head"),
])
QKV = re.compile(r"^transformer\.layers\.(\d+)\.attn\.qkv_proj\.weight$")
GLU = re.compile(r"^transformer\.layers\.(\d+)\.ffn\.proj_1\.weight$")
OURS_FUSED = re.compile(r"^layers\.\d+\.(attn\.[qkv]_proj|mlp\.(gate|up)_proj)\.weight$")


def _pair(value: Any) -> tuple[float, float] | None:
    return (float(value[0]), float(value[1])) if isinstance(value, (list, tuple)) and len(value) == 2 else None


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    n_layers, d_model = int(require(hf, "num_transformer_layers")), int(require(hf, "model_dim"))
    head_dim, groups = int(require(hf, "head_dim")), int(hf.get("num_gqa_groups", 1))
    divisor = int(hf.get("ffn_dim_divisor", 256))
    heads, kv_heads = hf.get("num_query_heads"), hf.get("num_kv_heads")
    ffn_mult = hf.get("ffn_multipliers")
    if not (isinstance(heads, list) and isinstance(kv_heads, list)):
        qkv = _pair(hf.get("qkv_multipliers")) or (float(hf.get("qkv_multipliers", 1.0)),) * 2
        derived = layerwise_scaling(n_layers, d_model, head_dim, qkv, (0.5, 4.0), groups, divisor)
        heads, kv_heads = derived["n_heads_per_layer"], derived["n_kv_heads_per_layer"]
    if isinstance(ffn_mult, list) and len(ffn_mult) == n_layers:  # released configs store the list
        ffn = tuple(make_divisible(m * d_model, divisor) for m in ffn_mult)
    else:
        pair = _pair(ffn_mult) or (float(ffn_mult or 4.0),) * 2
        ffn = layerwise_scaling(n_layers, d_model, head_dim, (1.0, 1.0), pair, 1, divisor)["ffn_hidden_per_layer"]
    if hf.get("activation_fn_name", "swish") not in ("swish", "silu") or not hf.get("ffn_with_glu", True):
        raise LmlabError("only OpenELM's SwiGLU FFN (activation swish, ffn_with_glu) is supported")
    return config_from_fields({
        "name": str(hf.get("_name_or_path") or "openelm").rstrip("/").split("/")[-1], "family": "openelm",
        "vocab_size": int(require(hf, "vocab_size")), "d_model": d_model, "n_layers": n_layers,
        "n_heads": max(heads), "head_dim": head_dim, "ffn_hidden": max(ffn),
        "n_heads_per_layer": tuple(heads), "n_kv_heads_per_layer": tuple(kv_heads), "ffn_hidden_per_layer": ffn,
        "max_seq_len": int(hf.get("max_context_length", 2048)), "norm_eps": 1e-6,
        "rope_theta": float(hf.get("rope_freq_constant", 10000)),
        "qk_norm": bool(hf.get("normalize_qk_projections", False)),
        "tie_embeddings": bool(hf.get("share_input_output_layers", False)),
    })


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    check_exportable(cfg, "OpenELM", ("n_experts", "sliding_window", "attn_bias", "attn_out_bias", "mlp_bias"))
    if cfg.rope_scaling is not None or cfg.norm_eps != 1e-6:
        raise LmlabError("OpenELM's format has no rope scaling and a fixed norm eps of 1e-6; this model cannot be exported")
    heads = [cfg.layer_heads(i) for i in range(cfg.n_layers)]
    return {
        "vocab_size": cfg.vocab_size,
        "num_transformer_layers": cfg.n_layers, "model_dim": cfg.d_model, "head_dim": cfg.dim_per_head,
        "num_query_heads": heads, "num_kv_heads": [cfg.layer_kv_heads(i) for i in range(cfg.n_layers)],
        "num_gqa_groups": heads[0] // cfg.layer_kv_heads(0), "ffn_dim_divisor": 1,
        # With divisor 1, make_divisible(m * d) == m * d: the widths survive the round trip.
        "ffn_multipliers": [cfg.layer_ffn(i) / cfg.d_model for i in range(cfg.n_layers)],
        "ffn_with_glu": True, "activation_fn_name": "swish", "normalization_layer_name": "rms_norm",
        "normalize_qk_projections": cfg.qk_norm, "share_input_output_layers": cfg.tie_embeddings,
        "rope_freq_constant": cfg.rope_theta, "max_context_length": cfg.max_seq_len,
        "rope_max_length": 2 * cfg.max_seq_len,
    }


def _rows_error(name: str, tensor: torch.Tensor, rows: int) -> LmlabError:
    return LmlabError(f"{name} has shape {tuple(tensor.shape)} but config.json implies {rows} rows; "
                      "the config and weights come from different models")


def weights_from_hf(cfg: ModelConfig, ckpt: HFCheckpoint) -> Tensors:
    yield from renamed_from_hf(KEYS, cfg, ckpt, skip=lambda n: bool(QKV.match(n) or GLU.match(n)))
    hd = cfg.dim_per_head
    for name in ckpt.keys():
        if m := QKV.match(name):
            i = int(m.group(1))
            sizes = [cfg.layer_heads(i) * hd, cfg.layer_kv_heads(i) * hd, cfg.layer_kv_heads(i) * hd]
            fused = ckpt[name]
            if fused.shape[0] != sum(sizes):
                raise _rows_error(name, fused, sum(sizes))
            for part, tensor in zip("qkv", fused.split(sizes)):
                yield f"layers.{i}.attn.{part}_proj.weight", tensor.contiguous()
        elif m := GLU.match(name):
            i = int(m.group(1))
            fused = ckpt[name]
            if fused.shape[0] != 2 * cfg.layer_ffn(i):
                raise _rows_error(name, fused, 2 * cfg.layer_ffn(i))
            gate, up = fused.split(cfg.layer_ffn(i))
            yield f"layers.{i}.mlp.gate_proj.weight", gate.contiguous()
            yield f"layers.{i}.mlp.up_proj.weight", up.contiguous()


def weights_to_hf(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> Tensors:
    yield from renamed_to_hf(KEYS, state, skip=lambda name: bool(OURS_FUSED.match(name)))
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        yield (f"transformer.layers.{i}.attn.qkv_proj.weight",
               torch.cat([state[f"{p}.attn.{x}_proj.weight"] for x in "qkv"]))
        yield (f"transformer.layers.{i}.ffn.proj_1.weight",
               torch.cat([state[f"{p}.mlp.gate_proj.weight"], state[f"{p}.mlp.up_proj.weight"]]))


FAMILY = register_family(Family(
    name="openelm",
    model_types=("openelm",),
    architectures=("OpenELMForCausalLM",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    weights_from_hf=weights_from_hf,
    weights_to_hf=weights_to_hf,
))
