"""Phi-3 checkpoints against transformers: fused qkv_proj / gate_up_proj split on import and
fused on export, sliding-window attention, same logits both ways."""
import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, Phi3Config, Phi3ForCausalLM  # noqa: E402

from hf_oracle import TOL, hf_logits, incremental_logits, max_diff, tiny_hf_model  # noqa: E402
from lmlab import load_model  # noqa: E402
from lmlab.checkpoint import model_from_state_dict  # noqa: E402
from lmlab.config import get_preset  # noqa: E402
from lmlab.errors import LmlabError  # noqa: E402
from lmlab.interop.hf import hf_config_to_model_config, load_hf_model, save_hf  # noqa: E402

CONFIG = dict(vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64, original_max_position_embeddings=64,
              rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VARIANTS = {
    "mha-window": dict(num_key_value_heads=4, sliding_window=6),
    "gqa-no-window": dict(num_key_value_heads=2, sliding_window=None),
    "gqa-tied-window": dict(num_key_value_heads=1, sliding_window=9, tie_word_embeddings=True),
}
WRONG = 1e-3


def ids(t=20):
    return torch.randint(0, 96, (2, t), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_dir(request, tmp_path_factory):
    model = tiny_hf_model(Phi3ForCausalLM, Phi3Config, **CONFIG, **VARIANTS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path, model


def test_checkpoint_is_fused(hf_dir):
    path, hf = hf_dir
    names = set(hf.state_dict())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names


def test_converted_logits_match_transformers(hf_dir):
    path, hf = hf_dir
    ours = load_model(path)
    assert ours.config.family == "phi3"
    assert ours.config.sliding_window == hf.config.sliding_window
    x = ids()
    with torch.no_grad():
        assert max_diff(ours(x), hf_logits(hf, x)) <= TOL


def test_kv_cache_decode_matches_transformers_full_forward(hf_dir):
    path, hf = hf_dir
    ours = load_hf_model(path)
    x = ids()
    assert max_diff(incremental_logits(ours, x, prefill=4), hf_logits(hf, x)) <= TOL


def test_export_fuses_and_loads_in_transformers(hf_dir, tmp_path):
    path, hf = hf_dir
    ours = load_hf_model(path)
    save_hf(ours, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(back) is Phi3ForCausalLM
    x = ids()
    with torch.no_grad():
        assert max_diff(hf_logits(back, x), ours(x)) <= TOL
    want, got = hf.state_dict(), back.state_dict()
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_sliding_window_matters():
    hf = tiny_hf_model(Phi3ForCausalLM, Phi3Config, **CONFIG, num_key_value_heads=2, sliding_window=4)
    cfg = hf_config_to_model_config(hf.config.to_dict())
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_hf_model(d)
    x = ids()
    full = model_from_state_dict(cfg.replace(sliding_window=None), ours.state_dict())
    off_by_one = model_from_state_dict(cfg.replace(sliding_window=5), ours.state_dict())
    with torch.no_grad():
        want = hf_logits(hf, x)
        assert max_diff(ours(x), want) <= TOL
        assert max_diff(full(x), want) > WRONG
        assert max_diff(off_by_one(x), want) > WRONG


def split_perturbations(ours):
    s = ours.state_dict()
    yield {"layers.0.attn.k_proj.weight": s["layers.0.attn.v_proj.weight"],
           "layers.0.attn.v_proj.weight": s["layers.0.attn.k_proj.weight"]}
    yield {"layers.1.mlp.gate_proj.weight": s["layers.1.mlp.up_proj.weight"],
           "layers.1.mlp.up_proj.weight": s["layers.1.mlp.gate_proj.weight"]}


def test_wrong_split_order_fails(hf_dir):
    path, hf = hf_dir
    ours = load_hf_model(path)
    x = ids()
    want = hf_logits(hf, x)
    for swap in split_perturbations(ours):
        wrong = model_from_state_dict(ours.config, {**ours.state_dict(), **swap})
        with torch.no_grad():
            assert max_diff(wrong(x), want) > WRONG


def test_real_phi3_mini_config_maps_to_the_preset():
    # The fields of microsoft/Phi-3-mini-4k-instruct's config.json.
    hf = {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 32064,
        "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
        "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000,
    }
    cfg = hf_config_to_model_config(hf)
    preset = get_preset("phi3-mini-4k")
    assert cfg.replace(name=preset.name, reference=preset.reference) == preset


def test_real_phi3_export_config(tmp_path):
    from lmlab.model import build_model

    model = build_model(get_preset("nano").replace(family="phi3", sliding_window=8, vocab_size=96))
    save_hf(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "phi3" and config["sliding_window"] == 8
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    x = ids()
    with torch.no_grad():
        assert max_diff(hf_logits(back, x), model(x)) <= TOL


def test_phi3_export_refuses_biases(tmp_path):
    from lmlab.model import build_model

    with pytest.raises(LmlabError, match="q/k/v biases"):
        save_hf(build_model(get_preset("nano").replace(family="phi3", attn_bias=True)), tmp_path / "o")


LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.3, 2.1, 3.7], "long_factor": [1.1, 2.9, 7.5, 19.0]}


@pytest.fixture(scope="module")
def longrope_dir(tmp_path_factory):
    hf = tiny_hf_model(Phi3ForCausalLM, Phi3Config, **{**CONFIG, "original_max_position_embeddings": 16},
                       num_key_value_heads=2, rope_scaling=LONGROPE)
    path = tmp_path_factory.mktemp("longrope")
    hf.save_pretrained(path)
    return path, hf


@pytest.mark.parametrize("t", [12, 16, 17, 30])  # short factors up to 16 positions, long beyond
def test_longrope_matches_transformers_below_and_beyond_the_original_length(longrope_dir, t):
    path, hf = longrope_dir
    ours = load_model(path)
    rope = ours.config.rope_scaling
    assert rope.kind == "longrope" and rope.original_max_seq_len == 16 and rope.factor == 4.0
    assert rope.attention_factor == pytest.approx((1 + torch.log(torch.tensor(4.0)).item() / torch.log(torch.tensor(16.0)).item()) ** 0.5)
    x = ids(t)
    with torch.no_grad():
        assert max_diff(ours(x), hf_logits(hf, x)) <= TOL


def test_longrope_factors_matter(longrope_dir):
    path, hf = longrope_dir
    ours = load_hf_model(path)
    rope = ours.config.rope_scaling
    x = ids(30)
    want = hf_logits(hf, x)
    short_only = model_from_state_dict(ours.config.replace(rope_scaling=rope.__class__(
        **{**rope.__dict__, "long_factor": rope.short_factor})), ours.state_dict())
    no_scaling = model_from_state_dict(ours.config.replace(rope_scaling=None), ours.state_dict())
    with torch.no_grad():
        assert max_diff(short_only(x), want) > WRONG
        assert max_diff(no_scaling(ids(12)), hf_logits(hf, ids(12))) > WRONG


def test_longrope_export_round_trip(longrope_dir, tmp_path):
    path, hf = longrope_dir
    ours = load_hf_model(path)
    save_hf(ours, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["original_max_position_embeddings"] == 16 and config["max_position_embeddings"] == 64
    assert set(config["rope_scaling"]) == {"type", "short_factor", "long_factor"}  # what transformers 4.x accepts
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    for t in (12, 30):
        x = ids(t)
        with torch.no_grad():
            assert max_diff(hf_logits(back, x), hf_logits(hf, x)) <= TOL
    assert hf_config_to_model_config(config) == ours.config.replace(name=hf_config_to_model_config(config).name)
