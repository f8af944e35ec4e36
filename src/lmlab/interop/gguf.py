"""GGUF export for llama.cpp: a Llama-family model and its byte-level BPE tokenizer in one
file that llama.cpp (and everything built on it) runs as `general.architecture = llama`.

What llama.cpp's `llama` architecture expects, and how we meet it:
- Tensor names `token_embd`, `blk.N.attn_q/k/v/output`, `blk.N.ffn_gate/up/down`,
  `blk.N.attn_norm/ffn_norm`, `output_norm`, `output` (absent when the head is tied: llama.cpp
  then reuses `token_embd`).
- Its RoPE (GGML's "normal" mode) rotates adjacent pairs (x[2i], x[2i+1]), while our weights,
  like Hugging Face's, are in the rotate-half layout that pairs x[i] with x[i + d/2]. So the
  rows of q_proj and k_proj are reordered within each head (`to_interleaved`), exactly as
  llama.cpp's convert_hf_to_gguf.py does for HF Llama checkpoints. Attention scores are
  unchanged because q and k get the same reordering.
- Quantisation uses gguf's own `quants` module; 1-D tensors (norms, biases) stay float32, and
  a matrix whose rows are not a whole number of q8_0 blocks (32 values) falls back to f16, both
  as llama.cpp's converter does.
- The tokenizer is written as `tokenizer.ggml.model = "gpt2"` (byte-level BPE) with the name of
  a pre-tokenizer llama.cpp implements (`PRE_TOKENIZERS`); anything we cannot match exactly
  is refused rather than exported to tokenise differently.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.io import atomic_path, read_json

ARCH = "llama"
TYPES = ("f32", "f16", "q8_0")
# Families whose compute graph is llama.cpp's `llama` arch (given the structural checks below).
FAMILIES = ("llama", "mistral")

# Pre-tokenizer regexes of Hugging Face tokenizer.json files -> the llama.cpp name that
# implements the same split (llama.cpp's llama-vocab.cpp, `tokenizer_pre` names).
LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
PRE_TOKENIZERS = {"bytelevel-gpt2": "gpt-2", "split-llama3": "llama-bpe"}


# ---------------------------------------------------------------------------------------
# Pure tensor math
# ---------------------------------------------------------------------------------------


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection (weight or bias) from the rotate-half RoPE
    layout (head rows [x_0..x_{d/2-1}, y_0..y_{d/2-1}]) to the interleaved one
    ([x_0, y_0, x_1, y_1, ...]) that llama.cpp's llama arch rotates."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise LmlabError(f"cannot split {rows} rows into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg: ModelConfig) -> torch.Tensor:
    """Per-frequency divisors that turn plain RoPE into Llama 3.1's scaled RoPE: llama.cpp
    reads them from `rope_freqs.weight` and divides each frequency by its factor."""
    from lmlab.model.rope import inverse_frequencies

    plain = inverse_frequencies(cfg.dim_per_head, cfg.rope_theta, None)
    scaled = inverse_frequencies(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling)
    return (plain.double() / scaled.double()).float()


# ---------------------------------------------------------------------------------------
# What can be exported
# ---------------------------------------------------------------------------------------


def check_llama_compatible(cfg: ModelConfig) -> None:
    """Refuse configs llama.cpp's `llama` arch would run differently from us."""
    if cfg.family not in FAMILIES:
        raise LmlabError(
            f"GGUF export supports the Llama family ({', '.join(FAMILIES)}), not {cfg.family!r}; "
            "export it with `lmlab convert to-hf` and use llama.cpp's convert_hf_to_gguf.py"
        )
    unsupported = {
        "n_experts": "mixture-of-experts layers",
        "qk_norm": "q/k RMSNorm",
        "n_heads_per_layer": "per-layer head counts",
        "n_kv_heads_per_layer": "per-layer KV head counts",
        "ffn_hidden_per_layer": "per-layer FFN widths",
        "sliding_window": "sliding-window attention",
    }
    for field, what in unsupported.items():
        if getattr(cfg, field):
            raise LmlabError(
                f"GGUF export: this model has {what} (model.{field}={getattr(cfg, field)!r}), which "
                "llama.cpp's llama architecture does not run; only plain Llama models are exported"
            )
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind not in ("llama3", "linear"):
        raise LmlabError(
            f"GGUF export: rope_scaling kind {cfg.rope_scaling.kind!r} is not supported "
            "(plain, 'linear' and 'llama3' RoPE are)"
        )


def _qtype(type: str):
    from gguf import GGMLQuantizationType as Q

    if type not in TYPES:
        raise LmlabError(f"unknown GGUF type {type!r}; choose one of {', '.join(TYPES)}")
    return {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[type]


def _file_type(type: str):
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0}[type]


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: its name, how to compute it (float32, our layout already undone) and
    the GGML type it is stored as."""

    name: str
    shape: tuple[int, ...]
    qtype: Any
    compute: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        from gguf import GGML_QUANT_SIZES

        block, size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def _storage_type(shape: tuple[int, ...], wanted):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    if len(shape) <= 1:
        return Q.F32  # llama.cpp's kernels take norms and biases in float32 only
    block = GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else Q.F16


def plan_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor], type: str) -> list[PlannedTensor]:
    """Our state dict -> llama.cpp's tensors, in llama.cpp's names and layout."""
    wanted = _qtype(type)
    names = [("embed.weight", "token_embd.weight", None)]
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"blk.{i}."
        names += [
            (ours + "attn_norm.weight", theirs + "attn_norm.weight", None),
            (ours + "attn.q_proj.weight", theirs + "attn_q.weight", cfg.layer_heads(i)),
            (ours + "attn.k_proj.weight", theirs + "attn_k.weight", cfg.layer_kv_heads(i)),
            (ours + "attn.v_proj.weight", theirs + "attn_v.weight", None),
            (ours + "attn.o_proj.weight", theirs + "attn_output.weight", None),
            (ours + "mlp_norm.weight", theirs + "ffn_norm.weight", None),
            (ours + "mlp.gate_proj.weight", theirs + "ffn_gate.weight", None),
            (ours + "mlp.up_proj.weight", theirs + "ffn_up.weight", None),
            (ours + "mlp.down_proj.weight", theirs + "ffn_down.weight", None),
        ]
        if cfg.attn_bias:
            names += [
                (ours + "attn.q_proj.bias", theirs + "attn_q.bias", cfg.layer_heads(i)),
                (ours + "attn.k_proj.bias", theirs + "attn_k.bias", cfg.layer_kv_heads(i)),
                (ours + "attn.v_proj.bias", theirs + "attn_v.bias", None),
            ]
        if cfg.attn_out_bias:
            names.append((ours + "attn.o_proj.bias", theirs + "attn_output.bias", None))
        if cfg.mlp_bias:
            names += [(ours + f"mlp.{p}_proj.bias", theirs + f"ffn_{p}.bias", None) for p in ("gate", "up", "down")]
    names.append(("norm.weight", "output_norm.weight", None))
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", "output.weight", None))

    plan = []
    for ours, theirs, heads in names:
        if ours not in state:
            raise LmlabError(f"the model has no {ours}; its weights do not match its config")
        tensor = state[ours]

        def compute(tensor=tensor, heads=heads) -> np.ndarray:
            t = tensor.detach().to("cpu", torch.float32)
            if heads is not None:
                t = to_interleaved(t, heads)
            return t.contiguous().numpy()

        shape = tuple(tensor.shape)
        plan.append(PlannedTensor(theirs, shape, _storage_type(shape, wanted), compute))
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3":
        factors = llama3_rope_factors(cfg)
        plan.append(PlannedTensor("rope_freqs.weight", tuple(factors.shape), _storage_type((1,), wanted),
                                  lambda f=factors: f.numpy()))
    return plan


def encode_tensor(t: PlannedTensor) -> np.ndarray:
    """The bytes (or floats) stored for `t`: its float32 values quantised to its type."""
    from gguf import quants

    return quants.quantize(t.compute(), t.qtype)


# ---------------------------------------------------------------------------------------
# Tokenizer metadata
# ---------------------------------------------------------------------------------------


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """The llama.cpp `tokenizer.ggml.pre` that splits text exactly like this tokenizer.json's
    pre-tokenizer, or an LmlabError naming what differs."""
    if tokenizer_json.get("normalizer") is not None:
        raise LmlabError(
            "GGUF export: the tokenizer has a normalizer, which llama.cpp's BPE tokenizers do not "
            "apply; only normalizer-free byte-level BPE tokenizers are exported"
        )
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return PRE_TOKENIZERS["bytelevel-gpt2"]
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if (len(steps) == 2 and steps[0].get("type") == "Split"
                and steps[0].get("pattern", {}).get("Regex") == LLAMA3_REGEX
                and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert", False)
                and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)
                and not steps[1].get("add_prefix_space", False)
                # llama.cpp's llama3 pre-type also skips merges for words already in the vocab
                and tokenizer_json.get("model", {}).get("ignore_merges", False)):
            return PRE_TOKENIZERS["split-llama3"]
    raise LmlabError(
        f"GGUF export: the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} matches none llama.cpp "
        "implements that lmlab knows (GPT-2 byte-level, Llama 3); pass pre=NAME (a llama.cpp "
        "tokenizer.ggml.pre name) only if you have checked it splits text identically"
    )


def _chat_template(model_dir: Path, tok) -> str | None:
    """The stored Jinja template if the directory has one; else, for a tokenizer with lmlab's
    role tokens, lmlab's own format (<|bos|> then <|role|>content<|end|> per message) as Jinja,
    so llama.cpp's chat completion renders exactly what `RoleTokenTemplate` trains on."""
    config_path = model_dir / "tokenizer_config.json"
    if config_path.is_file():
        template = read_json(config_path, "").get("chat_template")
        if isinstance(template, list):
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template:
            return template
    jinja_path = model_dir / "chat_template.jinja"
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8")
    if all(i is not None for i in tok.role_ids.values()):
        return (
            "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
            "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
        )
    return None


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str


def vocab_from_tokenizer(tok, vocab_size: int, pre: str | None = None) -> Vocab:
    """Tokens in id order with llama.cpp's token types, merges as "a b" strings, and the
    pre-tokenizer name; ids the model has beyond the tokenizer become unused padding tokens."""
    from gguf import TokenType

    if tok.kind != "hf":
        raise LmlabError(
            "GGUF export supports byte-level BPE tokenizers (tokenizer.json), not sentencepiece "
            "models; use llama.cpp's convert_hf_to_gguf.py on an HF export for those"
        )
    data = json.loads(tok.backend.to_str())
    model = data.get("model", {})
    decoder = data.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise LmlabError(
            "GGUF export supports byte-level BPE tokenizers only (BPE model, ByteLevel decoder, no "
            f"byte fallback); this one has model {model.get('type')!r} and decoder {decoder.get('type')!r}"
        )
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise LmlabError("GGUF export: BPE subword prefixes/suffixes are not supported by llama.cpp")
    pre = pre or pre_tokenizer_name(data)
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        raise LmlabError("GGUF export: the tokenizer's ids are not contiguous from 0; llama.cpp needs a dense vocab")
    if n > vocab_size:
        raise LmlabError(
            f"the tokenizer has {n} tokens but the model only {vocab_size} embeddings; they do not belong together"
        )
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    tokens = [""] * n
    for text, i in vocab.items():
        tokens[i] = text
    types = []
    for i in range(n):
        if i in added:
            types.append(int(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
    for i in range(n, vocab_size):  # the model's embedding rows beyond the tokenizer
        tokens.append(f"[PAD{i}]")
        types.append(int(TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return Vocab(tokens, types, merges, pre)


def _add_bos(model_dir: Path, tok) -> bool:
    """Whether llama.cpp should prepend BOS: the checkpoint's own setting if it has one, else
    whenever there is a BOS token (lmlab's generate prepends it)."""
    config_path = model_dir / "tokenizer_config.json"
    if config_path.is_file():
        value = read_json(config_path, "").get("add_bos_token")
        if isinstance(value, bool):
            return value
    return tok.bos_id is not None


# ---------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------


def _write_metadata(writer, cfg: ModelConfig, type: str, name: str) -> None:
    from gguf import RopeScalingType

    writer.add_name(name)
    writer.add_file_type(_file_type(type))
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_hidden)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads if cfg.n_kv_heads is not None else cfg.n_heads)
    writer.add_key_length(cfg.dim_per_head)
    writer.add_value_length(cfg.dim_per_head)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.dim_per_head)
    writer.add_vocab_size(cfg.vocab_size)
    rs = cfg.rope_scaling
    if rs is not None and rs.kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rs.factor)


def _write_tokenizer(writer, vocab: Vocab, tok, model_dir: Path) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if tok.bos_id is not None:
        writer.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        writer.add_eos_token_id(tok.eos_id)
    if tok.pad_id is not None:
        writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(_add_bos(model_dir, tok))
    writer.add_add_eos_token(False)
    template = _chat_template(model_dir, tok)
    if template:
        writer.add_chat_template(template)
        end = tok.role_ids.get("end")
        if end is not None and "<|end|>" in template:
            writer.add_eot_token_id(end)  # a chat answer ends at <|end|>, as lmlab's chat stops


def export_gguf(model_dir: str | Path, out_path: str | Path, type: str = "f32", pre: str | None = None) -> Path:
    """Write `model_dir` (an lmlab or Hugging Face Llama-family directory with a byte-level BPE
    tokenizer.json) as one GGUF file llama.cpp runs. `type`: f32, f16 or q8_0 for the matrices
    (norms and biases stay f32). `pre` overrides the detected llama.cpp pre-tokenizer name.
    The file appears only once complete."""
    try:
        import gguf
    except ImportError:
        raise LmlabError("GGUF export needs the `gguf` package: pip install 'lmlab[gguf]' (or pip install gguf)") from None

    import lmlab
    from lmlab.tokenizer import Tokenizer

    if type not in TYPES:  # fail before loading anything
        raise LmlabError(f"unknown GGUF type {type!r}; choose one of {', '.join(TYPES)}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    model = lmlab.load_model(model_dir)
    cfg = model.config
    check_llama_compatible(cfg)
    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise LmlabError(
            f"{model_dir} has no tokenizer.json: a GGUF file carries its tokenizer, so save the "
            "model together with the tokenizer it was trained with (save_model(..., tokenizer=tok))"
        )
    tok = Tokenizer.load(model_dir)
    vocab = vocab_from_tokenizer(tok, cfg.vocab_size, pre)
    plan = plan_tensors(cfg, model.state_dict(), type)

    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        try:
            _write_metadata(writer, cfg, type, cfg.name if cfg.name != "custom" else model_dir.name)
            _write_tokenizer(writer, vocab, tok, model_dir)
            for t in plan:
                # Declared up front and streamed below, so only one tensor is converted at a time.
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in plan:
                writer.write_tensor_data(encode_tensor(t))
        finally:
            writer.close()
    return out_path
