"""LoRA/DoRA against peft on a Hugging Face Llama with the same weights (the oracle), plus
merge/unmerge, adapter-only save/load and the parameter report checked by hand."""
from __future__ import annotations

import math

import pytest
import torch

from lmlab.adapters import (
    AdapterConfig, DoRALinear, LoRALinear, apply_adapters, load_adapter, merge_adapters,
    save_adapter, strip_adapters, unmerge_adapters,
)
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.model.transformer import build_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CFG = ModelConfig(name="t", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  ffn_hidden=48, max_seq_len=32)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HF_TO_OURS = {"self_attn.": "attn.", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "mlp_norm"}


def hf_llama():
    hf_cfg = transformers.LlamaConfig(
        vocab_size=CFG.vocab_size, hidden_size=CFG.d_model, intermediate_size=CFG.ffn_hidden,
        num_hidden_layers=CFG.n_layers, num_attention_heads=CFG.n_heads,
        num_key_value_heads=CFG.n_kv_heads, max_position_embeddings=CFG.max_seq_len,
        rms_norm_eps=CFG.norm_eps, rope_theta=CFG.rope_theta, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False,
    )
    model = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    model.config._attn_implementation = "eager"
    return model


def ours_key(hf_key: str) -> str:
    """HF Llama (or peft-wrapped) parameter name -> our module's name."""
    key = hf_key.removeprefix("base_model.model.").removeprefix("model.")
    key = key.replace("embed_tokens", "embed").replace(".lora_A.default.weight", ".lora_A")
    key = key.replace(".lora_B.default.weight", ".lora_B")
    key = key.replace(".lora_magnitude_vector.default.weight", ".magnitude")
    key = key.replace(".base_layer.", ".")
    for a, b in HF_TO_OURS.items():
        key = key.replace(a, b)
    return key


def ours_from_hf(hf) -> torch.nn.Module:
    ours = build_model(CFG).eval()
    state = {ours_key(k): v for k, v in hf.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    return ours


def randomize_adapters(peft_model) -> None:
    """B = 0 at init would make A's gradient zero and hide errors: use random values."""
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "magnitude" in name else 0.0))


def copy_adapters(peft_model, ours) -> None:
    own = dict(ours.named_parameters())
    with torch.no_grad():
        n = 0
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                own[ours_key(name)].copy_(p)
                n += 1
    assert n == sum(1 for k in own if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "magnitude"))


@pytest.mark.parametrize("method,rslora,dropout", [
    ("lora", False, 0.0), ("lora", True, 0.0), ("dora", False, 0.0), ("dora", True, 0.0),
    ("lora", False, 0.3), ("dora", False, 0.3),
])
def test_outputs_and_gradients_match_peft(method, rslora, dropout):
    hf = hf_llama()
    ours = ours_from_hf(hf)
    idx = torch.randint(0, CFG.vocab_size, (2, 9))
    torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)  # same base

    pcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS,
                           use_rslora=rslora, use_dora=method == "dora")
    pm = peft.get_peft_model(hf, pcfg)
    report = apply_adapters(ours, AdapterConfig(method=method, r=4, alpha=8, rslora=rslora,
                                                dropout=dropout, targets=tuple(TARGETS)))
    for name, p in pm.named_parameters():  # DoRA: magnitude starts at the row norm of W
        if "magnitude" in name:
            torch.testing.assert_close(dict(ours.named_parameters())[ours_key(name)], p, atol=0, rtol=0)
    assert report.trainable == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    randomize_adapters(pm)
    copy_adapters(pm, ours)

    target = torch.randint(0, CFG.vocab_size, (2, 9))
    # With dropout both draw their masks from the same seed in the same module order.
    pm.train(dropout > 0)
    ours.train(dropout > 0)
    torch.manual_seed(1)
    ref_logits = pm(input_ids=idx).logits
    torch.manual_seed(1)
    our_logits = ours(idx)
    torch.testing.assert_close(our_logits, ref_logits, atol=1e-5, rtol=1e-5)
    loss_fn = torch.nn.functional.cross_entropy
    loss_fn(ref_logits.flatten(0, 1), target.flatten()).backward()
    loss_fn(our_logits.flatten(0, 1), target.flatten()).backward()
    own = dict(ours.named_parameters())
    checked = 0
    for name, p in pm.named_parameters():
        if p.requires_grad:
            mine = own[ours_key(name)]
            assert mine.requires_grad
            torch.testing.assert_close(mine.grad, p.grad, atol=1e-5, rtol=1e-5, msg=name)
            checked += 1
    assert checked == sum(1 for p in ours.parameters() if p.requires_grad) > 0
    assert all(p.grad is None for p in ours.parameters() if not p.requires_grad)

    # Merged model == adapted model (dropout off); peft's merge agrees with ours.
    ours.eval()
    with torch.no_grad():
        adapted = ours(idx)
    merge_adapters(ours)
    torch.testing.assert_close(ours(idx), adapted, atol=1e-5, rtol=1e-5)
    merged_ref = pm.merge_and_unload()
    for name, w in merged_ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[ours_key(name)], w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_unmerge_restores_base_and_strip_exports_plain_model(method):
    model = build_model(CFG)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_adapters(model, AdapterConfig(method=method, r=4, alpha=8))
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.2)
    idx = torch.randint(0, CFG.vocab_size, (1, 7))
    adapted = model(idx).detach()
    merge_adapters(model)
    unmerge_adapters(model)
    for k, v in base.items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(idx), adapted, atol=1e-5, rtol=1e-5)
    strip_adapters(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(base)
    torch.testing.assert_close(model(idx), adapted, atol=1e-5, rtol=1e-5)


def test_init_matches_paper_and_adapted_model_starts_equal_to_base():
    model = build_model(CFG)
    idx = torch.randint(0, CFG.vocab_size, (1, 5))
    before = model(idx).detach()
    apply_adapters(model, AdapterConfig(method="dora", r=8, alpha=16))
    q = model.layers[0].attn.q_proj
    assert isinstance(q, DoRALinear)
    bound = 1 / math.sqrt(CFG.d_model)  # kaiming_uniform(a=sqrt 5) bound = 1/sqrt(fan_in)
    assert q.lora_A.abs().max() <= bound and q.lora_A.abs().max() > 0.9 * bound
    assert torch.count_nonzero(q.lora_B) == 0
    torch.testing.assert_close(q.magnitude, q.weight.norm(dim=1))
    torch.testing.assert_close(model(idx), before, atol=1e-6, rtol=0)
    assert not q.weight.requires_grad and not model.embed.weight.requires_grad


def test_adapter_only_round_trip(tmp_path):
    model = build_model(CFG)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_adapters(model, AdapterConfig(method="dora", r=2, alpha=4, rslora=True,
                                        targets=("re:layers\\.1\\..*_proj",)))
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.2)
    idx = torch.randint(0, CFG.vocab_size, (1, 6))
    expected = model(idx).detach()
    save_adapter(model, tmp_path / "ad")
    files = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert files == ["adapter.safetensors", "adapter_config.json"]
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    assert all(k.startswith("layers.1.") for k in saved)  # the adapter alone, only layer 1
    assert len(saved) == 7 * 3

    fresh = build_model(CFG)
    fresh.load_state_dict(base_state)
    load_adapter(fresh, tmp_path / "ad")
    assert fresh.adapter_config == model.adapter_config
    torch.testing.assert_close(fresh(idx), expected, atol=0, rtol=0)


def test_glob_patterns_and_errors():
    model = build_model(CFG)
    report = apply_adapters(model, AdapterConfig(targets=("layers.0.attn.*",)))
    assert report.adapted == tuple(f"layers.0.attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    with pytest.raises(LmlabError, match="already has adapters"):
        apply_adapters(model, AdapterConfig())
    with pytest.raises(LmlabError, match="match no nn.Linear"):
        apply_adapters(build_model(CFG), AdapterConfig(targets=("qproj",)))
    with pytest.raises(LmlabError, match="did you mean 'alpha'"):
        AdapterConfig.from_dict({"alpah": 3})
    with pytest.raises(LmlabError, match="method"):
        AdapterConfig.from_dict({"method": "qlora"})


def test_parameter_report_by_hand():
    model = build_model(CFG)
    report = apply_adapters(model, AdapterConfig(r=4, targets=("q_proj",)))
    # q_proj: (32 -> 32) per layer; A is 4x32, B is 32x4 -> 256 per layer, 2 layers.
    assert report.trainable == 2 * (4 * 32 + 32 * 4)
    base_total = sum(p.numel() for p in build_model(CFG).parameters())
    assert report.total == base_total + report.trainable
    assert report.weight_bytes == 4 * report.total
    assert report.grad_bytes == 4 * report.trainable
    assert report.optimizer_bytes == 8 * report.trainable  # AdamW: two float32 moments
    assert "trainable" in report.format()


def test_trainable_base_parameters_train_and_travel_with_the_adapter(tmp_path):
    model = build_model(CFG)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    report = apply_adapters(model, AdapterConfig(r=2, targets=("q_proj",), trainable=("embed", "lm_head")))
    lora = 2 * (2 * 32 + 32 * 2)
    assert report.trainable == lora + 2 * CFG.vocab_size * CFG.d_model
    assert model.embed.weight.requires_grad and not model.layers[0].attn.k_proj.weight.requires_grad
    with torch.no_grad():
        model.embed.weight.add_(0.5)
        model.layers[0].attn.q_proj.lora_B.normal_()
    idx = torch.randint(0, CFG.vocab_size, (1, 5))
    expected = model(idx).detach()
    save_adapter(model, tmp_path / "ad")
    fresh = build_model(CFG)
    fresh.load_state_dict(base_state)
    load_adapter(fresh, tmp_path / "ad")
    torch.testing.assert_close(fresh(idx), expected, atol=0, rtol=0)
    with pytest.raises(LmlabError, match="match no parameter"):
        apply_adapters(build_model(CFG), AdapterConfig(targets=("q_proj",), trainable=("embeddings",)))


def test_cli_adapter_merge_writes_a_plain_model(tmp_path):
    from lmlab.checkpoint import save_model
    from lmlab.hub import load_model
    from lmlab.cli import main

    base = build_model(CFG)
    save_model(base, tmp_path / "base")
    apply_adapters(base, AdapterConfig(method="dora", r=2, targets=("v_proj", "down_proj")))
    for m in base.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.2)
    idx = torch.randint(0, CFG.vocab_size, (1, 6))
    expected = base(idx).detach()
    save_adapter(base, tmp_path / "adapter")
    assert main(["adapter", "merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")]) == 0
    merged = load_model(tmp_path / "out")
    torch.testing.assert_close(merged(idx), expected, atol=1e-5, rtol=1e-5)
    assert main(["adapter", "merge", str(tmp_path / "base"), str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_16_bit_base_keeps_float32_adapters(method):
    model32 = build_model(CFG)
    model16 = build_model(CFG)
    model16.load_state_dict(model32.state_dict())
    model16.to(torch.bfloat16)
    apply_adapters(model16, AdapterConfig(method=method, r=4, targets=("q_proj", "up_proj")))
    apply_adapters(model32, AdapterConfig(method=method, r=4, targets=("q_proj", "up_proj")))
    for (_, a), (_, b) in zip(sorted(model32.named_parameters()), sorted(model16.named_parameters())):
        if a.requires_grad:
            assert b.dtype == torch.float32
            with torch.no_grad():
                a.copy_(torch.randn_like(a) * 0.1 + (1.0 if a.dim() == 1 else 0.0))
                b.copy_(a)
    idx = torch.randint(0, CFG.vocab_size, (2, 6))
    out16 = model16(idx)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), model32(idx), atol=0.1, rtol=0.05)
    out16.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in model16.parameters() if p.requires_grad)
