"""Llama family (Llama 2/3/3.1, TinyLlama, ...): `LlamaForCausalLM` checkpoints, and
Mistral (`MistralForCausalLM`), which is Llama without biases plus a sliding window.

HF's Llama q/k weights are already permuted into the rotate-half layout our RoPE uses
(Meta's original checkpoints are interleaved; transformers' own conversion permutes them),
so every tensor maps one to one.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from lmlab.config import ModelConfig
from lmlab.interop.hf import (
    Family, HFCheckpoint, KeyMap, Tensors, base_config_from_hf, base_config_to_hf, check_exportable,
    config_from_fields, register_family, renamed_from_hf, renamed_to_hf,
)

# Our name -> HF name, per module (suffix .weight/.bias carries over). Everything but the
# FFN is shared with Mixtral.
ATTENTION_KEYS = [
    ("embed", "model.embed_tokens"),
    ("layers.{i}.attn_norm", "model.layers.{i}.input_layernorm"),
    ("layers.{i}.attn.q_proj", "model.layers.{i}.self_attn.q_proj"),
    ("layers.{i}.attn.k_proj", "model.layers.{i}.self_attn.k_proj"),
    ("layers.{i}.attn.v_proj", "model.layers.{i}.self_attn.v_proj"),
    ("layers.{i}.attn.o_proj", "model.layers.{i}.self_attn.o_proj"),
    ("layers.{i}.mlp_norm", "model.layers.{i}.post_attention_layernorm"),
    ("norm", "model.norm"),
    ("lm_head", "lm_head"),
]
KEYS = KeyMap(ATTENTION_KEYS + [
    ("layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.gate_proj"),
    ("layers.{i}.mlp.up_proj", "model.layers.{i}.mlp.up_proj"),
    ("layers.{i}.mlp.down_proj", "model.layers.{i}.mlp.down_proj"),
])

# transformers' LlamaConfig defaults for keys a config.json may omit.
DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 10000.0, "hidden_act": "silu"}


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    fields = base_config_from_hf(hf, DEFAULTS)
    # HF's `attention_bias` puts a bias on q, k, v *and* o.
    bias = bool(hf.get("attention_bias", False))
    fields.update(family="llama", attn_bias=bias, attn_out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    return config_from_fields(fields)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    check_exportable(cfg, "Llama", ("qk_norm", "n_heads_per_layer", "n_kv_heads_per_layer",
                                    "ffn_hidden_per_layer", "n_experts", "sliding_window"))
    if cfg.attn_bias != cfg.attn_out_bias:
        check_exportable(cfg, "Llama", ("attn_bias", "attn_out_bias"))
    out = base_config_to_hf(cfg)
    out.update(attention_bias=cfg.attn_bias, mlp_bias=cfg.mlp_bias)
    return out


def weights_from_hf(cfg: ModelConfig, ckpt: HFCheckpoint) -> Tensors:
    return renamed_from_hf(KEYS, cfg, ckpt)


def weights_to_hf(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> Tensors:
    return renamed_to_hf(KEYS, state)


FAMILY = register_family(Family(
    name="llama",
    model_types=("llama",),
    architectures=("LlamaForCausalLM",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    weights_from_hf=weights_from_hf,
    weights_to_hf=weights_to_hf,
))


# transformers' MistralConfig defaults: note the 4096-token window when the key is absent.
MISTRAL_DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32, "rope_theta": 10000.0,
                    "hidden_act": "silu", "sliding_window": 4096}


def mistral_config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    fields = base_config_from_hf(hf, MISTRAL_DEFAULTS)
    fields.update(family="mistral")
    return config_from_fields(fields)


def mistral_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    check_exportable(cfg, "Mistral", ("qk_norm", "n_heads_per_layer", "n_kv_heads_per_layer",
                                      "ffn_hidden_per_layer", "n_experts", "attn_bias", "attn_out_bias",
                                      "mlp_bias"))
    return {**base_config_to_hf(cfg), "sliding_window": cfg.sliding_window}


MISTRAL = register_family(Family(
    name="mistral",
    model_types=("mistral",),
    architectures=("MistralForCausalLM",),
    config_from_hf=mistral_config_from_hf,
    config_to_hf=mistral_config_to_hf,
    weights_from_hf=weights_from_hf,
    weights_to_hf=weights_to_hf,
))
