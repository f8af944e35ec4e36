"""OpenELM: layer-wise scaling against Apple's released configs, and a checkpoint with
Apple's key names checked against a reference forward written here from the paper."""
import json
import math

import pytest
import torch

from lmlab.config import get_preset, layerwise_scaling, make_divisible
from lmlab.errors import LmlabError
from lmlab.interop.hf import load_hf_model, save_hf
from lmlab.summary import parameter_counts

# From Apple's released OpenELM-270M config.json.
RELEASED_270M = {
    "num_query_heads": [12, 12, 12, 12, 12, 16, 16, 16, 16, 16, 16, 16, 20, 20, 20, 20],
    "num_kv_heads": [3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5],
    "ffn_multipliers": [0.5, 0.73, 0.97, 1.2, 1.43, 1.67, 1.9, 2.13, 2.37, 2.6, 2.83, 3.07, 3.3, 3.53, 3.77, 4.0],
}


def test_270m_per_layer_dims_equal_the_released_config():
    cfg = get_preset("openelm-270m")
    assert list(cfg.n_heads_per_layer) == RELEASED_270M["num_query_heads"]
    assert list(cfg.n_kv_heads_per_layer) == RELEASED_270M["num_kv_heads"]
    # FFN width = multiplier * 1280 rounded to a multiple of 256 (hand-checked: 0.73 * 1280 = 934.4 -> 1024)
    assert cfg.ffn_hidden_per_layer[1] == 1024
    assert list(cfg.ffn_hidden_per_layer) == [make_divisible(m * 1280, 256) for m in RELEASED_270M["ffn_multipliers"]]
    assert cfg.ffn_hidden_per_layer[0] == 768 and cfg.ffn_hidden_per_layer[-1] == 5120


def test_first_and_last_layers_of_every_size():
    # (first layer heads, last layer heads, last FFN width): 0.5x and 1.0x attention width,
    # 0.5x and 4x FFN width, constant head size.
    expected = {"openelm-270m": (12, 20, 5120), "openelm-450m": (12, 24, 6144),
                "openelm-1.1b": (16, 32, 8192), "openelm-3b": (12, 24, 12288)}
    for name, (first, last, ffn_last) in expected.items():
        cfg = get_preset(name)
        assert (cfg.n_heads_per_layer[0], cfg.n_heads_per_layer[-1], cfg.ffn_hidden_per_layer[-1]) == (first, last, ffn_last)
        assert all(h == 4 * kv for h, kv in zip(cfg.n_heads_per_layer, cfg.n_kv_heads_per_layer))


@pytest.mark.parametrize("name,billions", [("openelm-270m", 0.27), ("openelm-450m", 0.45),
                                           ("openelm-1.1b", 1.08), ("openelm-3b", 3.04)])
def test_parameter_counts_match_the_paper_to_its_two_decimals(name, billions):
    assert abs(parameter_counts(get_preset(name))["total"] / 1e9 - billions) < 0.01


def test_make_divisible_rules():
    assert make_divisible(640, 256) == 768  # nearest multiple
    assert make_divisible(100, 256) == 256  # at least the divisor
    assert make_divisible(1100, 1000) == 1000 and make_divisible(1049, 1100) == 1100


TINY = dict(num_transformer_layers=3, model_dim=64, head_dim=16, num_gqa_groups=2, qkv_multipliers=[0.5, 1.0],
            ffn_multipliers=[0.5, 2.0], ffn_dim_divisor=32, normalize_qk_projections=True,
            share_input_output_layers=True, rope_freq_constant=10000, max_context_length=32, vocab_size=50)


def apple_checkpoint(tmp_path, config=TINY):
    """A random checkpoint laid out with Apple's tensor names and fused weights."""
    dims = layerwise_scaling(config["num_transformer_layers"], config["model_dim"], config["head_dim"],
                             tuple(config["qkv_multipliers"]), tuple(config["ffn_multipliers"]),
                             config["num_gqa_groups"], config["ffn_dim_divisor"])
    g = torch.Generator().manual_seed(0)
    r = lambda *shape, s=0.2: s * torch.randn(*shape, generator=g)  # noqa: E731
    d, hd = config["model_dim"], config["head_dim"]
    sd = {"transformer.token_embeddings.weight": r(config["vocab_size"], d, s=0.5),
          "transformer.norm.weight": 1 + r(d)}
    for i in range(config["num_transformer_layers"]):
        q, kv, f = dims["n_heads_per_layer"][i], dims["n_kv_heads_per_layer"][i], dims["ffn_hidden_per_layer"][i]
        p = f"transformer.layers.{i}."
        sd.update({p + "attn_norm.weight": 1 + r(d), p + "attn.qkv_proj.weight": r((q + 2 * kv) * hd, d),
                   p + "attn.q_norm.weight": 1 + r(hd), p + "attn.k_norm.weight": 1 + r(hd),
                   p + "attn.out_proj.weight": r(d, q * hd), p + "ffn_norm.weight": 1 + r(d),
                   p + "ffn.proj_1.weight": r(2 * f, d), p + "ffn.proj_2.weight": r(d, f)})
    from safetensors.torch import save_file

    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "openelm", **config, **{
        "num_query_heads": list(dims["n_heads_per_layer"]), "num_kv_heads": list(dims["n_kv_heads_per_layer"]),
        "ffn_multipliers": [f / d for f in dims["ffn_hidden_per_layer"]]}}))
    return sd, dims


def reference_forward(sd, dims, config, ids):
    """OpenELM from its equations: pre-norm blocks, fused qkv split by head counts, RMSNorm
    (eps 1e-6) on queries and keys before rotary embeddings, grouped KV heads, SwiGLU with
    the gate in the first half of proj_1, shared embeddings."""
    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6))

    hd, t = config["head_dim"], ids.shape[1]
    x = sd["transformer.token_embeddings.weight"][ids]
    inv = 1.0 / config["rope_freq_constant"] ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(t).float()[:, None] * inv
    cos, sin = ang.cos(), ang.sin()

    def rope(v):  # rotate pairs (i, i + hd/2)
        a, b = v[..., : hd // 2], v[..., hd // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    causal = torch.ones(t, t).tril().bool()
    for i in range(config["num_transformer_layers"]):
        p = f"transformer.layers.{i}."
        nq, nkv = dims["n_heads_per_layer"][i], dims["n_kv_heads_per_layer"][i]
        h = rms(x, sd[p + "attn_norm.weight"])
        qkv = (h @ sd[p + "attn.qkv_proj.weight"].T).view(1, t, nq + 2 * nkv, hd).transpose(1, 2)
        q, k, v = qkv.split([nq, nkv, nkv], dim=1)
        q, k = rope(rms(q, sd[p + "attn.q_norm.weight"])), rope(rms(k, sd[p + "attn.k_norm.weight"]))
        k, v = k.repeat_interleave(nq // nkv, 1), v.repeat_interleave(nq // nkv, 1)
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(hd)).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(1, 2).reshape(1, t, nq * hd) @ sd[p + "attn.out_proj.weight"].T
        h = rms(x, sd[p + "ffn_norm.weight"])
        g, u = (h @ sd[p + "ffn.proj_1.weight"].T).chunk(2, -1)
        x = x + (torch.nn.functional.silu(g) * u) @ sd[p + "ffn.proj_2.weight"].T
    return rms(x, sd["transformer.norm.weight"]) @ sd["transformer.token_embeddings.weight"].T


def test_apple_checkpoint_matches_reference_forward(tmp_path):
    sd, dims = apple_checkpoint(tmp_path)
    model = load_hf_model(tmp_path).eval()
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
    ref = reference_forward(sd, dims, TINY, ids)
    assert (ours - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max().item())  # float32, relative
    assert model.config.n_heads_per_layer == dims["n_heads_per_layer"] != (dims["n_heads_per_layer"][0],) * 3


def test_export_round_trip(tmp_path):
    apple_checkpoint(tmp_path / "apple")
    model = load_hf_model(tmp_path / "apple").eval()
    save_hf(model, tmp_path / "out")
    back = load_hf_model(tmp_path / "out").eval()
    assert back.config.ffn_hidden_per_layer == model.config.ffn_hidden_per_layer
    ids = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), atol=0, rtol=0)


def test_off_by_one_layer_widths_are_refused(tmp_path):
    apple_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_query_heads"] = config["num_query_heads"][1:] + config["num_query_heads"][:1]
    config["num_kv_heads"] = [h // 2 for h in config["num_query_heads"]]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmlabError, match="different models"):
        load_hf_model(tmp_path)
