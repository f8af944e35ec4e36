"""Llama checkpoints against transformers: the same logits after conversion in both
directions, with and without our KV cache, single-file and sharded."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from hf_oracle import TOL, hf_logits, incremental_logits, max_diff, tiny_hf_model  # noqa: E402
from lmlab import load_model  # noqa: E402
from lmlab.checkpoint import save_model  # noqa: E402
from lmlab.cli import main  # noqa: E402
from lmlab.config import RopeScaling, get_preset  # noqa: E402
from lmlab.errors import LmlabError  # noqa: E402
from lmlab.interop.hf import convert_to_hf, load_hf_model, rope_from_hf, save_hf  # noqa: E402
from lmlab.model import build_model  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
VARIANTS = {
    "mha-untied": dict(num_key_value_heads=4),
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "gqa-llama3-rope": dict(num_key_value_heads=1, rope_theta=500000.0, rope_scaling=LLAMA3),
    "linear-rope": dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "biases": dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    "head-dim": dict(num_key_value_heads=2, head_dim=16),
}


def ids(batch=2, t=20, vocab=96):
    return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_dir(request, tmp_path_factory):
    model = tiny_hf_model(LlamaForCausalLM, LlamaConfig, **BASE, **VARIANTS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path, model


def test_converted_logits_match_transformers(hf_dir):
    path, hf = hf_dir
    ours = load_model(path)
    x = ids()
    with torch.no_grad():
        assert max_diff(ours(x), hf_logits(hf, x)) <= TOL


def test_kv_cache_decode_matches_transformers_full_forward(hf_dir):
    path, hf = hf_dir
    ours = load_hf_model(path)
    x = ids()
    assert max_diff(incremental_logits(ours, x, prefill=5), hf_logits(hf, x)) <= TOL


def test_export_loads_in_transformers_with_same_logits_and_tensors(hf_dir, tmp_path):
    path, hf = hf_dir
    ours = load_hf_model(path)
    save_hf(ours, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    x = ids()
    with torch.no_grad():
        assert max_diff(hf_logits(back, x), ours(x)) <= TOL
    assert type(back) is LlamaForCausalLM
    want, got = hf.state_dict(), back.state_dict()
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_config_fields_are_carried(hf_dir):
    path, hf = hf_dir
    cfg = load_hf_model(path).config
    c = hf.config
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads) == (96, 32, 2, 4)
    assert cfg.layer_kv_heads(0) == c.num_key_value_heads
    assert cfg.dim_per_head == c.head_dim and cfg.ffn_hidden == 56 and cfg.max_seq_len == 64
    assert cfg.norm_eps == 1e-5 and cfg.tie_embeddings == c.tie_word_embeddings
    assert cfg.attn_bias == cfg.attn_out_bias == c.attention_bias and cfg.mlp_bias == c.mlp_bias


def test_llama3_rope_scaling_is_read_and_matters(tmp_path):
    hf = tiny_hf_model(LlamaForCausalLM, LlamaConfig, **BASE, num_key_value_heads=2,
                       rope_theta=500000.0, rope_scaling=LLAMA3)
    hf.save_pretrained(tmp_path)
    ours = load_hf_model(tmp_path)
    assert ours.config.rope_theta == 500000.0
    assert ours.config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 16)
    unscaled = load_hf_model(tmp_path)
    unscaled.config = unscaled.config.replace(rope_scaling=None)
    unscaled.reset_rope()
    x = ids(t=40)
    with torch.no_grad():
        assert max_diff(unscaled(x), hf_logits(hf, x)) > 1e-3  # the scaling is not a no-op here
        assert max_diff(ours(x), hf_logits(hf, x)) <= TOL


def test_both_rope_config_layouts():
    legacy = {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **{k: v for k, v in LLAMA3.items() if k != "rope_type"}}}
    new = {"rope_parameters": {**LLAMA3, "rope_theta": 500000.0}}
    assert rope_from_hf(legacy) == rope_from_hf(new) == (500000.0, RopeScaling("llama3", 8.0, 1.0, 4.0, 16))
    assert rope_from_hf({}) == (10000.0, None)
    assert rope_from_hf({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}) == (1e6, None)
    with pytest.raises(LmlabError, match="rope_type='yarn'"):
        rope_from_hf({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}})


def test_sharded_checkpoint_loads(tmp_path):
    hf = tiny_hf_model(LlamaForCausalLM, LlamaConfig, **BASE, num_key_value_heads=2)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ours = load_model(tmp_path / "hf")
    x = ids()
    with torch.no_grad():
        assert max_diff(ours(x), hf_logits(hf, x)) <= TOL


def test_our_sharded_export_loads_in_transformers(tmp_path):
    model = build_model(get_preset("nano").replace(vocab_size=96, max_seq_len=64))
    save_hf(model, tmp_path / "hf", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / "hf" / f).is_file() for f in files)
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    x = ids()
    with torch.no_grad():
        assert max_diff(hf_logits(back, x), model(x)) <= TOL


def test_cli_round_trip_keeps_tokenizer_files_and_token_ids(tmp_path):
    hf = tiny_hf_model(LlamaForCausalLM, LlamaConfig, **BASE, num_key_value_heads=2,
                       bos_token_id=3, eos_token_id=4)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text('{"fake": true}')
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert (tmp_path / "ours" / "tokenizer.json").read_text() == '{"fake": true}'
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["format"] == "lmlab"
    assert main(["convert", "to-hf", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (3, 4)
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    x = ids()
    assert max_diff(hf_logits(back, x), hf_logits(hf, x)) <= TOL


def test_bf16_checkpoint_keeps_dtype_or_casts(tmp_path):
    hf = tiny_hf_model(LlamaForCausalLM, LlamaConfig, **BASE, num_key_value_heads=2).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    assert load_hf_model(tmp_path).embed.weight.dtype == torch.bfloat16
    ours = load_hf_model(tmp_path, dtype=torch.float32)
    assert ours.embed.weight.dtype == torch.float32
    torch.testing.assert_close(ours.embed.weight, hf.model.embed_tokens.weight.float(), rtol=0, atol=0)


def test_refuses_pickled_only_checkpoint(tmp_path):
    hf = tiny_hf_model(LlamaForCausalLM, LlamaConfig, **BASE)
    hf.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(LmlabError, match="never unpickles.*safetensors"):
        load_model(tmp_path)


def test_refuses_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(LmlabError, match="unsupported architecture.*LlamaForCausalLM"):
        load_model(tmp_path)


def test_refuses_nonempty_output_and_non_lmlab_source(tmp_path):
    save_model(build_model(get_preset("nano")), tmp_path / "ours")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(LmlabError, match="not empty"):
        convert_to_hf(tmp_path / "ours", tmp_path / "busy")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(LmlabError, match="not an lmlab checkpoint"):
        convert_to_hf(tmp_path / "hf", tmp_path / "new")


def test_export_refuses_what_llama_cannot_express(tmp_path):
    model = build_model(get_preset("nano").replace(qk_norm=True))
    with pytest.raises(LmlabError, match="q/k normalisation"):
        save_hf(model, tmp_path / "out")


@pytest.mark.parametrize("window", [5, None])
def test_mistral_converts_both_ways(tmp_path, window):
    from transformers import MistralConfig, MistralForCausalLM

    hf = tiny_hf_model(MistralForCausalLM, MistralConfig, **BASE, num_key_value_heads=2, sliding_window=window)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert (ours.config.family, ours.config.sliding_window) == ("mistral", window)
    x = ids()
    want = hf_logits(hf, x)
    with torch.no_grad():
        assert max_diff(ours(x), want) <= TOL
    assert max_diff(incremental_logits(ours, x, prefill=3), want) <= TOL
    save_hf(ours, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(back) is MistralForCausalLM
    assert max_diff(hf_logits(back, x), want) <= TOL


def test_mistral_window_defaults_to_4096_when_absent():
    from lmlab.interop.hf import hf_config_to_model_config

    hf = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
          "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}
    assert hf_config_to_model_config(hf).sliding_window == 4096
    assert hf_config_to_model_config({**hf, "sliding_window": None}).sliding_window is None


# Published config.json files (architecture fields as on the Hugging Face hub).
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "mlp_bias": False,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256,
    "bos_token_id": 128000, "eos_token_id": 128001,
}
TINYLLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 5632, "max_position_embeddings": 2048, "num_attention_heads": 32,
    "num_hidden_layers": 22, "num_key_value_heads": 4, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "tie_word_embeddings": False, "vocab_size": 32000,
}
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 11008, "max_position_embeddings": 4096, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "tie_word_embeddings": False, "vocab_size": 32000,
}


@pytest.mark.parametrize("hf,preset", [(LLAMA31_8B, "llama3.1-8b"), (TINYLLAMA, "tinyllama-1.1b"),
                                       (LLAMA2_7B, "llama2-7b")])
def test_published_configs_map_to_the_presets(hf, preset):
    from lmlab.interop.hf import hf_config_to_model_config

    cfg, want = hf_config_to_model_config(hf), get_preset(preset)
    assert cfg.replace(name=want.name, reference=want.reference) == want


@pytest.mark.parametrize("preset", ["llama3.1-8b", "tinyllama-1.1b", "llama2-7b"])
def test_preset_configs_export_and_read_back(preset):
    from lmlab.interop.hf import hf_config_to_model_config
    from lmlab.interop.llama import config_to_hf

    cfg = get_preset(preset)
    hf = {"model_type": "llama", **config_to_hf(cfg)}
    assert hf_config_to_model_config(hf).replace(name=cfg.name, reference=cfg.reference) == cfg
    built = LlamaConfig(**{k: v for k, v in hf.items() if k != "model_type"})  # transformers accepts it
    assert built.rope_parameters["rope_theta"] == cfg.rope_theta


def test_left_padded_batch_matches_transformers(hf_dir):
    path, hf = hf_dir
    ours = load_hf_model(path)
    x = ids(t=12)
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[1, :4] = False  # row 1 is left-padded by 4
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(input_ids=x, attention_mask=valid.long(), position_ids=positions, use_cache=False).logits
        got = ours(x, positions=positions, attn_mask=valid)
    assert max_diff(got[valid], want[valid]) <= TOL
