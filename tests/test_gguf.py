"""GGUF export: the file reads back with gguf's own reader with llama.cpp's names, shapes,
types and metadata; q/k rows are in the interleaved RoPE layout (checked with a hand-written
inverse and by RoPE math); q8_0 dequantises close to the float weights; refusals are clean.
llama.cpp itself runs the export in tests/test_gguf_llamacpp.py (slow tier)."""
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from hf_oracle import randomize  # noqa: E402
from lmlab.checkpoint import save_model  # noqa: E402
from lmlab.config import RopeScaling, get_preset  # noqa: E402
from lmlab.data.chat import RoleTokenTemplate  # noqa: E402
from lmlab.data.corpus import embedded_corpus_texts  # noqa: E402
from lmlab.errors import LmlabError  # noqa: E402
from lmlab.interop import gguf as ggufx  # noqa: E402
from lmlab.interop.gguf import export_gguf, pre_tokenizer_name, to_interleaved  # noqa: E402
from lmlab.model import build_model  # noqa: E402
from lmlab.tokenizer import train_tokenizer  # noqa: E402

TOKENIZER_VOCAB = 600
# More embeddings than tokens: llama.cpp needs one token entry per row (padding tokens).
CFG = replace(get_preset("nano"), vocab_size=640, ffn_hidden=160)  # GQA: 4 heads, 2 KV heads


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([t[:3000] for t in embedded_corpus_texts()[:10]], TOKENIZER_VOCAB)


def _model_dir(tmp_path_factory, tok, cfg, name):
    # Norms not all 1 and biases not all 0, so a swapped or unpermuted one shows.
    model = randomize(build_model(cfg))
    path = tmp_path_factory.mktemp(name)
    save_model(model, path, tokenizer=tok)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def untied(tmp_path_factory, tok):
    return _model_dir(tmp_path_factory, tok, CFG, "untied")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, untied):
    path, _ = untied
    out = tmp_path_factory.mktemp("gguf")
    return {t: gguf.GGUFReader(export_gguf(path, out / f"m-{t}.gguf", t)) for t in ("f32", "f16", "q8_0")}


def field(reader, key):
    return reader.fields[key].contents()


def tensors(reader):
    return {t.name: t for t in reader.tensors}


def expected_names(n_layers, tied):
    names = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not tied else set())
    for i in range(n_layers):
        names |= {f"blk.{i}.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                  "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    return names


# ---------------------------------------------------------------------------------------
# Layout math
# ---------------------------------------------------------------------------------------


def test_to_interleaved_on_a_hand_worked_example():
    # 2 heads of size 4: rotate-half rows (x0, x1, y0, y1) become (x0, y0, x1, y1).
    w = torch.arange(8.0)[:, None]
    assert to_interleaved(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def interleaved_rope(x, pos, theta):
    """RoPE as llama.cpp's normal mode does it: rotate each adjacent pair (x[2i], x[2i+1])."""
    d = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(freqs), pos * freqs)).reshape(x.shape)


def test_interleaved_layout_gives_the_same_attention_scores():
    """q.k under our rotate-half RoPE == under interleaved RoPE applied to reordered q/k."""
    from lmlab.model.rope import apply_rope, inverse_frequencies, rope_cos_sin

    d, theta = 16, 10000.0
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.tensor([5, 2]), inverse_frequencies(d, theta), torch.float64)
    ours = apply_rope(q, cos[0], sin[0]) @ apply_rope(k, cos[1], sin[1])
    theirs = (interleaved_rope(to_interleaved(q[:, None], 1)[:, 0], 5, theta)
              @ interleaved_rope(to_interleaved(k[:, None], 1)[:, 0], 2, theta))
    assert abs(ours.item() - theirs.item()) < 1e-6  # our frequencies are float32
    unordered = interleaved_rope(q, 5, theta) @ interleaved_rope(k, 2, theta)
    assert abs(ours.item() - unordered.item()) > 1e-3  # the reordering is what makes them agree


def test_llama3_rope_factors_match_llama_cpp_formula():
    """llama.cpp's converter's loop (convert_hf_to_gguf.py), written out independently."""
    rs = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64)
    cfg = replace(CFG, rope_scaling=rs, rope_theta=500000.0)
    d = cfg.dim_per_head
    expected = []
    for i in range(0, d, 2):
        freq = 1.0 / 500000.0 ** (i / d)
        wavelen = 2 * math.pi / freq
        if wavelen < 64 / 4.0:
            expected.append(1.0)
        elif wavelen > 64 / 1.0:
            expected.append(8.0)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append(1 / ((1 - smooth) / 8.0 + smooth))
    assert torch.allclose(ggufx.llama3_rope_factors(cfg), torch.tensor(expected), rtol=1e-5)


# ---------------------------------------------------------------------------------------
# The written file
# ---------------------------------------------------------------------------------------


def test_metadata(exported, tok):
    r = exported["f32"]
    expected = {
        "general.architecture": "llama",
        "llama.context_length": 128, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": 160, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
        "llama.rope.freq_base": 10000.0, "llama.vocab_size": 640,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.padding_token_id": 2, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.eot_token_id": tok.token_to_id("<|end|>"),
    }
    for key, value in expected.items():
        assert field(r, key) == value, key
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field(r, "general.file_type") == int(gguf.LlamaFileType.ALL_F32)
    assert field(exported["q8_0"], "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)


def test_vocab(exported, tok):
    r = exported["f32"]
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 640
    data = json.loads(tok.backend.to_str())
    added = {t["id"] for t in data["added_tokens"]}
    for text, i in data["model"]["vocab"].items():
        assert tokens[i] == text
        assert types[i] == (gguf.TokenType.CONTROL if i in added else gguf.TokenType.NORMAL)
    for added in data["added_tokens"]:  # our 7 special tokens
        assert tokens[added["id"]] == added["content"] and types[added["id"]] == gguf.TokenType.CONTROL
    assert tokens[600:] == [f"[PAD{i}]" for i in range(600, 640)]
    assert set(types[600:]) == {gguf.TokenType.UNUSED}
    assert field(r, "tokenizer.ggml.merges") == [" ".join(m) for m in data["model"]["merges"]]


def test_tensor_names_shapes_and_types(exported):
    Q = gguf.GGMLQuantizationType
    for kind, matrix in (("f32", Q.F32), ("f16", Q.F16), ("q8_0", Q.Q8_0)):
        ts = tensors(exported[kind])
        assert set(ts) == expected_names(2, tied=False)
        # GGUF lists dimensions fastest-first: (in_features, out_features).
        assert list(ts["token_embd.weight"].shape) == [64, 640]
        assert list(ts["output.weight"].shape) == [64, 640]
        assert list(ts["blk.0.attn_q.weight"].shape) == [64, 64]
        assert list(ts["blk.0.attn_k.weight"].shape) == [64, 32]
        assert list(ts["blk.1.attn_v.weight"].shape) == [64, 32]
        assert list(ts["blk.0.ffn_gate.weight"].shape) == [64, 160]
        assert list(ts["blk.0.ffn_down.weight"].shape) == [160, 64]
        assert list(ts["output_norm.weight"].shape) == [64]
        for name, t in ts.items():
            want = Q.F32 if name.endswith("norm.weight") else matrix
            assert t.tensor_type == want, (kind, name)


def test_q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32(tmp_path_factory, tok):
    path, state = _model_dir(tmp_path_factory, tok, replace(CFG, ffn_hidden=172), "ffn172")
    ts = tensors(gguf.GGUFReader(export_gguf(path, path / "m.gguf", "q8_0")))
    Q = gguf.GGMLQuantizationType
    assert ts["blk.0.ffn_down.weight"].tensor_type == Q.F16  # rows of 172
    assert ts["blk.0.ffn_up.weight"].tensor_type == Q.Q8_0  # rows of 64
    np.testing.assert_array_equal(ts["blk.0.ffn_down.weight"].data,
                                  state["layers.0.mlp.down_proj.weight"].numpy().astype(np.float16))


def undo_interleave(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Hand-written inverse: within each head, row 2j came from row j and row 2j+1 from row
    j + head_dim/2 of the rotate-half layout."""
    d = rows.shape[0] // n_heads
    out = np.empty_like(rows)
    for h in range(n_heads):
        for j in range(d // 2):
            out[h * d + j] = rows[h * d + 2 * j]
            out[h * d + j + d // 2] = rows[h * d + 2 * j + 1]
    return out


def test_f32_tensors_are_ours_with_qk_reordered(exported, untied):
    _, state = untied
    ts = tensors(exported["f32"])
    np.testing.assert_array_equal(undo_interleave(ts["blk.1.attn_q.weight"].data, 4),
                                  state["layers.1.attn.q_proj.weight"].numpy())
    np.testing.assert_array_equal(undo_interleave(ts["blk.1.attn_k.weight"].data, 2),
                                  state["layers.1.attn.k_proj.weight"].numpy())
    # ...and the reordering is not the identity, so the checks above can fail.
    assert not np.array_equal(ts["blk.1.attn_q.weight"].data, state["layers.1.attn.q_proj.weight"].numpy())
    same = {"token_embd.weight": "embed.weight", "output.weight": "lm_head.weight",
            "blk.0.attn_v.weight": "layers.0.attn.v_proj.weight",
            "blk.0.attn_output.weight": "layers.0.attn.o_proj.weight",
            "blk.1.ffn_gate.weight": "layers.1.mlp.gate_proj.weight",
            "blk.1.ffn_up.weight": "layers.1.mlp.up_proj.weight",
            "blk.1.ffn_down.weight": "layers.1.mlp.down_proj.weight",
            "blk.1.attn_norm.weight": "layers.1.attn_norm.weight",
            "blk.1.ffn_norm.weight": "layers.1.mlp_norm.weight", "output_norm.weight": "norm.weight"}
    for theirs, ours in same.items():
        np.testing.assert_array_equal(ts[theirs].data, state[ours].numpy(), err_msg=theirs)


def test_q8_0_dequantises_close_to_the_float_weights(exported, untied):
    _, state = untied
    ts = tensors(exported["q8_0"])
    checked = 0
    for name, t in ts.items():
        if t.tensor_type != gguf.GGMLQuantizationType.Q8_0:
            continue
        ref = tensors(exported["f32"])[name].data
        deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
        # Symmetric 8-bit blocks of 32: each value is off by at most half a step (block max / 127),
        # plus the f16 rounding of the block scale.
        blocks = np.abs(ref).reshape(-1, 32).max(axis=1, keepdims=True)
        bound = blocks / 127 * 0.5 + blocks * 2e-3
        assert np.all(np.abs(deq - ref).reshape(-1, 32) <= bound), name
        assert np.abs(deq - ref).max() > 0  # really quantised
        checked += 1
    assert checked == 1 + 2 * 7 + 1  # embeddings, 7 matrices per block, output


def test_f16_is_a_plain_cast(exported):
    for name, t in tensors(exported["f16"]).items():
        ref = tensors(exported["f32"])[name].data
        want = ref if name.endswith("norm.weight") else ref.astype(np.float16)
        np.testing.assert_array_equal(t.data, want, err_msg=name)


def test_tied_head_has_no_output_tensor(tmp_path_factory, tok):
    path, _ = _model_dir(tmp_path_factory, tok, replace(CFG, tie_embeddings=True), "tied")
    ts = tensors(gguf.GGUFReader(export_gguf(path, path / "m.gguf")))
    assert set(ts) == expected_names(2, tied=True)


def test_biases_and_llama3_rope_are_exported(tmp_path_factory, tok):
    rs = RopeScaling("llama3", factor=8.0, original_max_seq_len=64)
    cfg = replace(CFG, attn_bias=True, attn_out_bias=True, mlp_bias=True, rope_scaling=rs)
    path, state = _model_dir(tmp_path_factory, tok, cfg, "bias")
    ts = tensors(gguf.GGUFReader(export_gguf(path, path / "m.gguf", "q8_0")))
    extra = {"rope_freqs.weight"} | {f"blk.{i}.{n}.bias" for i in range(2) for n in
                                     ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(ts) == expected_names(2, tied=False) | extra
    assert ts["blk.0.attn_q.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(undo_interleave(ts["blk.0.attn_k.bias"].data[:, None], 2)[:, 0],
                                  state["layers.0.attn.k_proj.bias"].numpy())
    assert list(ts["rope_freqs.weight"].shape) == [8]


def test_linear_rope_scaling_metadata(tmp_path_factory, tok):
    path, _ = _model_dir(tmp_path_factory, tok, replace(CFG, rope_scaling=RopeScaling("linear", factor=4.0)), "lin")
    r = gguf.GGUFReader(export_gguf(path, path / "m.gguf"))
    assert field(r, "llama.rope.scaling.type") == "linear"
    assert field(r, "llama.rope.scaling.factor") == 4.0


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------

# llama.cpp's regex for its "gpt-2" pre-tokenizer (src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_GPT2).
LLAMA_CPP_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
TEXTS = ["Hello, world!  It's 2024.", "naïve café — 東京 😀 ελληνικά", "x  =  [1,2,3]\n\n\tdef f():\n    return 42",
         "   leading and trailing   ", "don't I'll we've THEY'RE", "123456789 3.14159 -7", "\n\n\n", "a\u00a0b\u3000c"]


def llama_cpp_split(text):
    """llama.cpp keeps the text between regex matches as pieces too."""
    regex = pytest.importorskip("regex")
    pieces, last = [], 0
    for m in regex.finditer(LLAMA_CPP_GPT2, text):
        if m.start() > last:
            pieces.append(text[last:m.start()])
        pieces.append(m.group())
        last = m.end()
    if last < len(text):
        pieces.append(text[last:])
    return pieces


def test_trained_tokenizer_uses_llama_cpp_gpt2_pre_tokenizer(tok):
    data = json.loads(tok.backend.to_str())
    assert pre_tokenizer_name(data) == "gpt-2"
    byte_level = tok.backend.pre_tokenizer
    from tokenizers.decoders import ByteLevel as ByteLevelDecoder

    decode = ByteLevelDecoder()
    for text in TEXTS:
        ours = [decode.decode([piece]) for piece, _ in byte_level.pre_tokenize_str(text)]
        assert ours == llama_cpp_split(text), text


def test_unknown_pre_tokenizers_and_normalizers_are_refused():
    with pytest.raises(LmlabError, match="pre-tokenizer"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}})
    with pytest.raises(LmlabError, match="pre-tokenizer"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}})
    with pytest.raises(LmlabError, match="normalizer"):
        pre_tokenizer_name({"normalizer": {"type": "NFC"}, "pre_tokenizer": {"type": "ByteLevel"}})
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": ggufx.LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    assert pre_tokenizer_name({"pre_tokenizer": llama3, "model": {"ignore_merges": True}}) == "llama-bpe"


def test_chat_template_renders_what_role_token_template_trains_on(exported, tok):
    jinja2 = pytest.importorskip("jinja2")
    template = field(exported["f32"], "tokenizer.chat_template")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    text = jinja2.Template(template).render(messages=messages, add_generation_prompt=True, bos_token="<|bos|>")
    assert tok.encode(text) == RoleTokenTemplate(tok).encode_prompt(messages)


# ---------------------------------------------------------------------------------------
# Refusals and atomic writes
# ---------------------------------------------------------------------------------------


def test_moe_and_unknown_type_are_refused(tmp_path_factory, tok, untied):
    moe = replace(get_preset("micro-moe"), vocab_size=640, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                  ffn_hidden=32, n_experts=2, top_k=1)
    path, _ = _model_dir(tmp_path_factory, tok, moe, "moe")
    with pytest.raises(LmlabError, match="Llama family"):
        export_gguf(path, path / "m.gguf")
    with pytest.raises(LmlabError, match="mixture-of-experts"):
        ggufx.check_llama_compatible(replace(moe, family="llama"))
    with pytest.raises(LmlabError, match="sliding-window"):
        ggufx.check_llama_compatible(replace(CFG, family="mistral", sliding_window=32))
    with pytest.raises(LmlabError, match="unknown GGUF type"):
        export_gguf(untied[0], path / "m.gguf", "q4_k")
    assert not (path / "m.gguf").exists()


def test_model_without_a_byte_level_tokenizer_is_refused(tmp_path_factory):
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers

    from lmlab.tokenizer import Tokenizer

    backend = Backend(models.BPE(vocab={"a": 0, "b": 1, "▁": 2}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    model = build_model(replace(CFG, vocab_size=8))
    path = tmp_path_factory.mktemp("metaspace")
    save_model(model, path, tokenizer=Tokenizer(backend, "hf", None, None, None))
    with pytest.raises(LmlabError, match="byte-level BPE"):
        export_gguf(path, path / "m.gguf")


def test_failed_export_leaves_no_file(untied, tmp_path, monkeypatch):
    path, _ = untied
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous")
    calls = {"n": 0}
    real = ggufx.encode_tensor

    def failing(t):
        calls["n"] += 1
        if calls["n"] == 5:  # header and several tensors are already on disk
            raise RuntimeError("disk full")
        return real(t)

    monkeypatch.setattr(ggufx, "encode_tensor", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(path, out)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_model_without_a_tokenizer_is_refused(tmp_path):
    save_model(build_model(CFG), tmp_path)
    with pytest.raises(LmlabError, match="no tokenizer.json"):
        export_gguf(tmp_path, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
