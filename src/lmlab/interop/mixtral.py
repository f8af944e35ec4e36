"""Mixtral (`MixtralForCausalLM`): Llama attention, and per layer a router
(`block_sparse_moe.gate`) with E SwiGLU experts stored one matrix per expert
(`experts.{j}.w1` = gate, `w3` = up, `w2` = down). That is what transformers 5.x's
`save_pretrained` writes by default, although its model holds the experts fused
(`mlp.experts.gate_up_proj` (E, 2h, d) gate rows first, `mlp.experts.down_proj` (E, d, h),
router `mlp.gate`); `save_pretrained(save_original_format=False)` writes that fused layout,
so import reads both. We keep the experts stacked per projection, so import stacks (or
splits) and export writes the per-expert layout every Mixtral loader reads.
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
from lmlab.interop.llama import ATTENTION_KEYS

KEYS = KeyMap(ATTENTION_KEYS + [("layers.{i}.mlp.router", "model.layers.{i}.block_sparse_moe.gate")])
FUSED_ROUTER = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight$")
FUSED_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up|down)_proj$")
EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
OURS_EXPERTS = re.compile(r"^layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")
PROJ = {"w1": "gate", "w3": "up", "w2": "down"}
WEIGHT = {v: k for k, v in PROJ.items()}

# transformers' MixtralConfig defaults for keys a config.json may omit.
DEFAULTS = {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32, "rope_theta": 1e6,
            "hidden_act": "silu", "sliding_window": None}


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    fields = base_config_from_hf(hf, DEFAULTS)
    fields.update(family="mixtral", n_experts=int(hf.get("num_local_experts", 8)),
                  top_k=int(hf.get("num_experts_per_tok", 2)),
                  moe_aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.001)))
    return config_from_fields(fields)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    check_exportable(cfg, "Mixtral", ("qk_norm", "n_heads_per_layer", "n_kv_heads_per_layer",
                                      "ffn_hidden_per_layer", "attn_bias", "attn_out_bias", "mlp_bias"))
    if not cfg.is_moe:
        raise LmlabError("a dense model cannot be exported as Mixtral; use the llama family")
    out = base_config_to_hf(cfg)
    out.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
               router_aux_loss_coef=cfg.moe_aux_loss_weight, sliding_window=cfg.sliding_window)
    return out


def _fused_from_hf(cfg: ModelConfig, ckpt: HFCheckpoint) -> Tensors:
    for name in ckpt.keys():
        if m := FUSED_ROUTER.match(name):
            yield f"layers.{m.group(1)}.mlp.router.weight", ckpt[name]
        elif m := FUSED_EXPERTS.match(name):
            prefix, tensor = f"layers.{m.group(1)}.mlp", ckpt[name]
            if tensor.shape[0] != cfg.n_experts:
                raise LmlabError(f"{name} holds {tensor.shape[0]} experts, but config.json says "
                                 f"num_local_experts={cfg.n_experts}; the checkpoint is inconsistent")
            if m.group(2) == "down":
                yield f"{prefix}.down_proj.weight", tensor
            else:
                gate, up = tensor.chunk(2, dim=1)
                yield f"{prefix}.gate_proj.weight", gate.contiguous()
                yield f"{prefix}.up_proj.weight", up.contiguous()


def weights_from_hf(cfg: ModelConfig, ckpt: HFCheckpoint) -> Tensors:
    fused = lambda name: bool(FUSED_ROUTER.match(name) or FUSED_EXPERTS.match(name))  # noqa: E731
    yield from renamed_from_hf(KEYS, cfg, ckpt, skip=lambda name: bool(EXPERT.match(name)) or fused(name))
    yield from _fused_from_hf(cfg, ckpt)
    found: dict[tuple[int, str], dict[int, str]] = {}
    for name in ckpt.keys():
        if m := EXPERT.match(name):
            found.setdefault((int(m.group(1)), PROJ[m.group(3)]), {})[int(m.group(2))] = name
    for (layer, proj), names in sorted(found.items()):
        if sorted(names) != list(range(cfg.n_experts)):
            raise LmlabError(
                f"layer {layer} has {proj} weights for experts {sorted(names)}, but config.json says "
                f"num_local_experts={cfg.n_experts}; the checkpoint is incomplete"
            )
        yield f"layers.{layer}.mlp.{proj}_proj.weight", torch.stack([ckpt[names[j]] for j in range(cfg.n_experts)])


def weights_to_hf(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> Tensors:
    yield from renamed_to_hf(KEYS, state, skip=lambda name: bool(OURS_EXPERTS.match(name)))
    for name, stacked in state.items():
        if m := OURS_EXPERTS.match(name):
            layer, proj = m.group(1), m.group(2)
            for j, matrix in enumerate(stacked.unbind(0)):
                yield f"model.layers.{layer}.block_sparse_moe.experts.{j}.{WEIGHT[proj]}.weight", matrix.contiguous()


FAMILY = register_family(Family(
    name="mixtral",
    model_types=("mixtral",),
    architectures=("MixtralForCausalLM",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    weights_from_hf=weights_from_hf,
    weights_to_hf=weights_to_hf,
))
