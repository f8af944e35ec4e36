"""The exactness tests can fail: each classic conversion mistake, planted on purpose, moves
the logits far past the tolerance the real tests use."""
import types

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import lmlab.model.attention as attention  # noqa: E402
from hf_oracle import TOL, hf_logits, max_diff, tiny_hf_model  # noqa: E402
from lmlab.checkpoint import model_from_state_dict  # noqa: E402
from lmlab.interop.hf import load_hf_model  # noqa: E402

CONFIG = dict(vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
WRONG = 1e-3  # every planted mistake must move the logits at least this far (100x TOL)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = tiny_hf_model(LlamaForCausalLM, LlamaConfig, **CONFIG)
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(path)
    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    return load_hf_model(path), hf_logits(hf, x), x


def logits(model, x):
    with torch.no_grad():
        return model(x)


def rebuilt(model, cfg=None, **replace_tensors):
    state = {**model.state_dict(), **replace_tensors}
    return model_from_state_dict(cfg or model.config, state)


def test_the_unperturbed_model_passes(pair):
    ours, want, x = pair
    assert max_diff(logits(ours, x), want) <= TOL


def interleaved_rope(x, cos, sin):
    """RoPE on adjacent pairs (x0, x1), (x2, x3), ... (Meta's original layout) instead of
    rotate-half pairs (x_i, x_{i+d/2})."""
    half = x.shape[-1] // 2
    cos = cos[..., :half].repeat_interleave(2, dim=-1)
    sin = sin[..., :half].repeat_interleave(2, dim=-1)
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((-odd, even), dim=-1).flatten(-2)
    return x * cos + rotated * sin


def test_wrong_rope_convention_fails(pair, monkeypatch):
    ours, want, x = pair
    monkeypatch.setattr(attention, "apply_rope", interleaved_rope)
    assert max_diff(logits(ours, x), want) > WRONG


def tiled_gqa_sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
    """KV heads tiled (query head h reads KV head h % n_kv) instead of grouped (h // group)."""
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1),
                                          attn_mask=attn_mask, is_causal=is_causal)


def test_wrong_gqa_grouping_fails(pair, monkeypatch):
    ours, want, x = pair
    assert ours.config.layer_kv_heads(0) < ours.config.n_heads
    monkeypatch.setattr(attention, "F", types.SimpleNamespace(scaled_dot_product_attention=tiled_gqa_sdpa))
    assert max_diff(logits(ours, x), want) > WRONG


def test_wrong_norm_eps_fails(pair):
    ours, want, x = pair
    assert ours.config.norm_eps == 1e-5
    wrong = rebuilt(ours, ours.config.replace(norm_eps=1e-6))  # LlamaConfig's default, a likely slip
    assert max_diff(logits(wrong, x), want) > WRONG


@pytest.mark.parametrize("name", ["layers.0.attn.o_proj.weight", "layers.1.attn.q_proj.weight"])
def test_transposed_weight_fails(pair, name):
    ours, want, x = pair
    weight = ours.state_dict()[name]
    assert weight.shape[0] == weight.shape[1]  # square, so the shape check cannot catch it
    wrong = rebuilt(ours, **{name: weight.t().contiguous()})
    assert max_diff(logits(wrong, x), want) > WRONG


def test_swapped_norms_fail(pair):
    ours, want, x = pair
    s = ours.state_dict()
    wrong = rebuilt(ours, **{"layers.0.attn_norm.weight": s["layers.0.mlp_norm.weight"],
                             "layers.0.mlp_norm.weight": s["layers.0.attn_norm.weight"]})
    assert max_diff(logits(wrong, x), want) > WRONG
