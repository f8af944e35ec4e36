"""LoRA and DoRA on a MoE block's stacked experts, against peft as the oracle:
- LoRA: peft's `target_parameters` LoRA on transformers' Mixtral experts (one rank-r update
  per expert on the fused gate_up and the down stack) gives the same logits and gradients;
- DoRA (which peft does not offer on stacked parameters): peft's DoRA on one nn.Linear per
  expert, evaluated token by token from the definition of the block, gives the same output
  and gradients as our grouped dispatch.
Plus merge/unmerge, strip, adapter-only save/load and export of an adapted MoE model."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from lmlab.adapters import (
    AdapterConfig, DoRAExperts, LoRAExperts, apply_adapters, load_adapter, merge_adapters, save_adapter,
    strip_adapters, unmerge_adapters,
)
from lmlab.config import get_preset
from lmlab.model import build_model
from lmlab.model.moe import GroupedLinear, MoE

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from hf_oracle import TOL, hf_logits, max_diff  # noqa: E402
from test_moe import IDS, tiny_mixtral  # noqa: E402

R, ALPHA = 4, 8.0
SMALL_MOE = replace(get_preset("micro-moe"), vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    ffn_hidden=48, n_experts=6)


@pytest.fixture(params=[False, True], ids=["lora", "rslora"])
def pair(tmp_path, request):
    """transformers' Mixtral with peft LoRA (or rsLoRA) on q_proj and on every expert stack,
    and our converted model with the same adapter values (random, so no gradient vanishes)."""
    from lmlab.interop.hf import load_hf_model

    hf = tiny_mixtral()
    hf.save_pretrained(tmp_path)
    ours = load_hf_model(tmp_path).eval()
    rslora = request.param
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"], use_rslora=rslora,
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    theirs = peft.get_peft_model(hf, cfg).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    apply_adapters(ours, AdapterConfig(r=R, alpha=ALPHA, rslora=rslora,
                                       targets=("q_proj", "gate_proj", "up_proj", "down_proj")))
    with torch.no_grad():
        for name, tensor in expert_adapters_from_peft(theirs, ours.config).items():
            ours.get_parameter(name).copy_(tensor)
    return theirs, ours


def peft_expert_factors(theirs, layer: int) -> dict[str, torch.Tensor]:
    """peft's (E·r, in) A and (out, E·r) B for the fused gate_up stack (nested base_layer)
    and the down stack of one layer, plus q_proj's."""
    prefix = f"base_model.model.model.layers.{layer}."
    p = dict(theirs.named_parameters())
    return {
        "gate_up.A": p[prefix + "mlp.experts.base_layer.lora_A.default.weight"],
        "gate_up.B": p[prefix + "mlp.experts.base_layer.lora_B.default.weight"],
        "down.A": p[prefix + "mlp.experts.lora_A.default.weight"],
        "down.B": p[prefix + "mlp.experts.lora_B.default.weight"],
        "q.A": p[prefix + "self_attn.q_proj.lora_A.default.weight"],
        "q.B": p[prefix + "self_attn.q_proj.lora_B.default.weight"],
    }


def per_expert(a: torch.Tensor, b: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's layout -> ours: A rows are expert-major (E, r, in); B columns are rank-major
    with the expert last, (out, r, E) -> (E, out, r)."""
    return a.reshape(e, -1, a.shape[-1]), b.reshape(b.shape[0], -1, e).permute(2, 0, 1)


def expert_adapters_from_peft(theirs, cfg, grad: bool = False) -> dict[str, torch.Tensor]:
    """Our adapter tensors (or, with grad, what their gradients must be) from peft's."""
    out, h, e = {}, cfg.ffn_hidden, cfg.n_experts
    for i in range(cfg.n_layers):
        f = {k: (v.grad if grad else v.detach()) for k, v in peft_expert_factors(theirs, i).items()}
        a, b = per_expert(f["gate_up.A"], f["gate_up.B"], e)
        ours = f"layers.{i}.mlp."
        # Fused gate_up shares one A: ours keeps one per projection with equal values, so
        # peft's gradient for A is the sum of our two.
        out[ours + "gate_proj.lora_A"] = a if not grad else None
        out[ours + "up_proj.lora_A"] = a if not grad else None
        if grad:
            out[ours + "gate_up.lora_A"] = a
        out[ours + "gate_proj.lora_B"], out[ours + "up_proj.lora_B"] = b[:, :h], b[:, h:]
        out[ours + "down_proj.lora_A"], out[ours + "down_proj.lora_B"] = per_expert(f["down.A"], f["down.B"], e)
        out[f"layers.{i}.attn.q_proj.lora_A"], out[f"layers.{i}.attn.q_proj.lora_B"] = f["q.A"], f["q.B"]
    return {k: v for k, v in out.items() if v is not None}


def test_expert_lora_logits_and_gradients_match_peft(pair):
    theirs, ours = pair
    assert sum(isinstance(m, LoRAExperts) for m in ours.modules()) == 3 * ours.config.n_layers
    target = torch.randn(2, 11, 96, generator=torch.Generator().manual_seed(1))
    ref = theirs(input_ids=IDS, use_cache=False).logits
    got = ours(IDS)
    assert max_diff(got, ref) <= TOL
    (ref * target).sum().backward()
    (got * target).sum().backward()
    want = expert_adapters_from_peft(theirs, ours.config, grad=True)
    for i in range(ours.config.n_layers):
        mlp = ours.layers[i].mlp
        summed = mlp.gate_proj.lora_A.grad + mlp.up_proj.lora_A.grad
        fused = want.pop(f"layers.{i}.mlp.gate_up.lora_A")
        # float32 relative error: the two sides sum in another order (AMX kernels differ most)
        assert max_diff(summed, fused) <= 1e-5 * max(1.0, fused.abs().max().item())
    for name, g in want.items():
        scale = g.abs().max().item()
        assert scale > 0 and max_diff(ours.get_parameter(name).grad, g) <= 1e-5 * max(1.0, scale), name
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)


def test_a_wrong_expert_order_is_caught(pair):
    """The comparison above is sensitive to the per-expert layout: swapping two experts'
    adapters (but not their weights) moves the logits."""
    theirs, ours = pair
    ref = theirs(input_ids=IDS, use_cache=False).logits.detach()
    with torch.no_grad():
        b = ours.layers[0].mlp.down_proj.lora_B
        b[[0, 1]] = b[[1, 0]]
        assert max_diff(ours(IDS), ref) > 1e-3


class PeftExperts(nn.Module):
    """One MoE block written as the definition: per expert three nn.Linear, so that peft's
    own (nn.Linear) DoRA can adapt them; evaluated token by token, slot by slot."""

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        e = moe.n_experts
        self.experts = nn.ModuleList()
        for j in range(e):
            expert = nn.Module()
            for proj in ("gate_proj", "up_proj", "down_proj"):
                w = getattr(moe, proj).weight[j]
                lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
                lin.weight.data.copy_(w.detach())
                setattr(expert, proj, lin)
            self.experts.append(expert)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        rows = []
        for t in range(x.shape[0]):
            y = 0
            for j, w in zip(experts[t].tolist(), weights[t]):
                ex = self.experts[j]
                xt = x[t:t + 1]
                y = y + w * ex.down_proj(nn.functional.silu(ex.gate_proj(xt)) * ex.up_proj(xt))
            rows.append(y)
        return torch.cat(rows)


def test_expert_dora_output_and_gradients_match_peft_per_expert_linears():
    torch.manual_seed(0)
    cfg = SMALL_MOE
    moe = build_model(cfg).layers[0].mlp
    oracle = peft.get_peft_model(PeftExperts(moe), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, use_dora=True, target_modules=["gate_proj", "up_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if "magnitude" in name else 0.0))
    holder = nn.Module()
    holder.mlp = moe
    apply_adapters(holder, AdapterConfig(method="dora", r=R, alpha=ALPHA, targets=("gate_proj", "up_proj", "down_proj")))
    theirs = dict(oracle.named_parameters())

    def peft_tensor(j, proj, kind):
        prefix = f"base_model.model.experts.{j}.{proj}."
        key = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
               "magnitude": "lora_magnitude_vector.default.weight"}[kind]
        return theirs[prefix + key]

    with torch.no_grad():
        for proj in ("gate_proj", "up_proj", "down_proj"):
            module = getattr(moe, proj)
            assert isinstance(module, DoRAExperts) and module.magnitude.shape == (cfg.n_experts, module.out_features)
            for kind in ("lora_A", "lora_B", "magnitude"):
                getattr(module, kind).copy_(torch.stack([peft_tensor(j, proj, kind) for j in range(cfg.n_experts)]))

    x = torch.randn(40, cfg.d_model, generator=gen)
    _, experts, weights = moe.route(x)
    assert len(experts.unique()) > 2  # several groups, so the per-expert scaling is exercised
    target = torch.randn(40, cfg.d_model, generator=gen)
    ref = oracle(x, experts, weights.detach())
    got = moe(x)
    assert max_diff(got, ref) <= TOL
    (ref * target).sum().backward()
    (got * target).sum().backward()
    for proj in ("gate_proj", "up_proj", "down_proj"):
        module = getattr(moe, proj)
        for kind in ("lora_A", "lora_B", "magnitude"):
            want = torch.stack([peft_tensor(j, proj, kind).grad for j in range(cfg.n_experts)])
            assert max_diff(getattr(module, kind).grad, want) <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_unmerge_strip_and_adapter_round_trip_on_moe(method, tmp_path):
    torch.manual_seed(0)
    model = build_model(SMALL_MOE).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    apply_adapters(model, AdapterConfig(method=method, r=R, alpha=ALPHA))
    adapted_experts = [n for n, m in model.named_modules() if isinstance(m, (LoRAExperts, DoRAExperts))]
    assert len(adapted_experts) == 3 * model.config.n_layers  # the default targets include the experts
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "magnitude" in n:
                p.add_(0.05 * torch.randn_like(p))
        adapted = model(ids)
        save_adapter(model, tmp_path / "adapter")
        merge_adapters(model)
        assert max_diff(model(ids), adapted) <= 1e-5
        unmerge_adapters(model)
        restored = model.state_dict()
        assert all(max_diff(restored[k], v) <= 1e-5 for k, v in base.items())

    fresh = build_model(SMALL_MOE).eval()
    fresh.load_state_dict(base)
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert max_diff(fresh(ids), adapted) <= 1e-6
        strip_adapters(fresh)
        assert all(type(m.mlp.gate_proj) is GroupedLinear for m in fresh.layers)
        assert max_diff(fresh(ids), adapted) <= 1e-5
    assert set(fresh.state_dict()) == set(base)


def test_merged_moe_adapter_exports_to_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from lmlab.interop.hf import save_hf

    torch.manual_seed(0)
    model = build_model(SMALL_MOE).eval()
    apply_adapters(model, AdapterConfig(r=R, alpha=ALPHA, targets=("gate_proj", "down_proj")))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
        ids = torch.randint(0, model.config.vocab_size, (1, 12))
        adapted = model(ids)
    save_hf(strip_adapters(model), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert max_diff(hf_logits(hf, ids), adapted) <= 1e-4
