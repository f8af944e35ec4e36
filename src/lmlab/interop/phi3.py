"""Phi-3 family: `Phi3ForCausalLM` checkpoints.

Phi-3 fuses the attention input projections into one `qkv_proj` (rows: all query heads, then
the key heads, then the value heads) and the MLP's gate and up projections into one
`gate_up_proj` (gate rows first). We keep them separate, so they are split on import and
concatenated on export; everything else maps one to one like Llama.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.interop.hf import (
    Family, HFCheckpoint, KeyMap, Tensors, base_config_from_hf, base_config_to_hf, check_exportable,
    config_from_fields, register_family, renamed_from_hf, renamed_to_hf,
)

KEYS = KeyMap([
    ("embed", "model.embed_tokens"),
    ("layers.{i}.attn_norm", "model.layers.{i}.input_layernorm"),
    ("layers.{i}.attn.o_proj", "model.layers.{i}.self_attn.o_proj"),
    ("layers.{i}.mlp_norm", "model.layers.{i}.post_attention_layernorm"),
    ("layers.{i}.mlp.down_proj", "model.layers.{i}.mlp.down_proj"),
    ("norm", "model.norm"),
    ("lm_head", "lm_head"),
])
QKV = re.compile(r"^model\.layers\.(\d+)\.self_attn\.qkv_proj\.weight$")
GATE_UP = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight$")
OURS_FUSED = re.compile(r"^layers\.\d+\.(attn\.[qkv]_proj|mlp\.(gate|up)_proj)\.weight$")

# transformers' Phi3Config defaults for keys a config.json may omit.
DEFAULTS = {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "rope_theta": 10000.0, "hidden_act": "silu"}


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    fields = base_config_from_hf(hf, DEFAULTS)
    fields.update(family="phi3")
    return config_from_fields(fields)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    check_exportable(cfg, "Phi-3", ("qk_norm", "n_heads_per_layer", "n_kv_heads_per_layer",
                                    "ffn_hidden_per_layer", "n_experts", "attn_bias", "attn_out_bias",
                                    "mlp_bias"))
    out = base_config_to_hf(cfg)
    rope = cfg.rope_scaling
    original = rope.original_max_seq_len if rope is not None and rope.kind == "longrope" else cfg.max_seq_len
    out.update(sliding_window=cfg.sliding_window, original_max_position_embeddings=original)
    return out


def _is_fused(name: str) -> bool:
    return bool(QKV.match(name) or GATE_UP.match(name))


def weights_from_hf(cfg: ModelConfig, ckpt: HFCheckpoint) -> Tensors:
    yield from renamed_from_hf(KEYS, cfg, ckpt, skip=_is_fused)
    hd = cfg.dim_per_head
    for name in ckpt.keys():
        if m := QKV.match(name):
            i = int(m.group(1))
            sizes = [cfg.layer_heads(i) * hd, cfg.layer_kv_heads(i) * hd, cfg.layer_kv_heads(i) * hd]
            qkv = ckpt[name]
            if qkv.shape[0] != sum(sizes):
                raise _shape_error(name, qkv, sum(sizes))
            for part, tensor in zip("qkv", qkv.split(sizes, dim=0)):
                yield f"layers.{i}.attn.{part}_proj.weight", tensor.contiguous()
        elif m := GATE_UP.match(name):
            i = int(m.group(1))
            gate_up = ckpt[name]
            if gate_up.shape[0] != 2 * cfg.layer_ffn(i):
                raise _shape_error(name, gate_up, 2 * cfg.layer_ffn(i))
            gate, up = gate_up.split(cfg.layer_ffn(i), dim=0)
            yield f"layers.{i}.mlp.gate_proj.weight", gate.contiguous()
            yield f"layers.{i}.mlp.up_proj.weight", up.contiguous()


def _shape_error(name: str, tensor: torch.Tensor, rows: int) -> LmlabError:
    return LmlabError(
        f"{name} has shape {tuple(tensor.shape)} but config.json implies {rows} rows; "
        "the config and weights come from different models"
    )


def weights_to_hf(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> Tensors:
    yield from renamed_to_hf(KEYS, state, skip=lambda name: bool(OURS_FUSED.match(name)))
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        yield (f"model.layers.{i}.self_attn.qkv_proj.weight",
               torch.cat([state[f"{p}.attn.{x}_proj.weight"] for x in "qkv"], dim=0))
        yield (f"model.layers.{i}.mlp.gate_up_proj.weight",
               torch.cat([state[f"{p}.mlp.gate_proj.weight"], state[f"{p}.mlp.up_proj.weight"]], dim=0))


FAMILY = register_family(Family(
    name="phi3",
    model_types=("phi3",),
    architectures=("Phi3ForCausalLM",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    weights_from_hf=weights_from_hf,
    weights_to_hf=weights_to_hf,
))
