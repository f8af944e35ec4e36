"""llama.cpp runs our GGUF export: the same tokens for a varied text set, the same logits and
the same greedy continuation as lmlab, for a briefly trained GQA micro model.

Needs llama-cpp-python (compiled from source; build and cache it once with
tools/build_llama_cpp.sh); skipped without it.
"""
import contextlib
from dataclasses import replace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed: run tools/build_llama_cpp.sh (builds and caches it once)"
)

from hf_oracle import randomize  # noqa: E402
from lmlab.checkpoint import save_model  # noqa: E402
from lmlab.config import RopeScaling, get_preset  # noqa: E402
from lmlab.data.corpus import embedded_corpus_texts  # noqa: E402
from lmlab.decode.generate import generate  # noqa: E402
from lmlab.interop.gguf import export_gguf  # noqa: E402
from lmlab.model import build_model  # noqa: E402
from lmlab.tokenizer import train_tokenizer  # noqa: E402

N_NEW = 40
PROMPTS = ["The model", "def main():\n    ", "Once upon a time, there"]
TEXTS = [
    "Hello, world! It's a test of the tokenizer.",
    "naïve café résumé — Zürich, Ελληνικά, Русский, العربية, 東京都, 한국어, हिन्दी",
    "emoji 😀👍🏽 and symbols ™ © ½ ∑ ∞ → ≤",
    "digits 0 1 12 123 1234 12345 3.14159 -42 1e-5 2024-06-01",
    "spaces:  two   three    four\ttab\t\ttabs\n\nnewlines\r\nCRLF   \n  trailing   ",
    "   leading spaces", "\n\n\n", " ", "a\u00a0b\u2009c\u3000d",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n",
    "if (a && b || !c) { x += 1; } // C-ish\n\tprintf(\"%d\\n\", x);",
    "don't I'll we've they're SHE'S O'Neil 'quoted'",
    "<|user|>Hi there<|end|><|assistant|>",
    "UPPER lower MiXeD snake_case camelCase kebab-case",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A micro-shaped GQA model (8 heads, 4 KV heads) trained briefly on the embedded corpus,
    so its predictions are peaked rather than uniform and greedy decoding is well defined."""
    texts = embedded_corpus_texts()[:40]
    tok = train_tokenizer(texts, 1024)
    cfg = replace(get_preset("micro"), vocab_size=tok.vocab_size, n_layers=2, max_seq_len=256)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.tensor([i for t in texts for i in tok.encode(t) + [tok.eos_id]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):  # fewer steps leave greedy decoding stuck on one token
        starts = torch.randint(0, len(ids) - 129, (8,), generator=gen)
        batch = torch.stack([ids[s:s + 129] for s in starts])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path = tmp_path_factory.mktemp("trained")
    save_model(model, path, tokenizer=tok)
    return path, model, tok, loss.item()


def load(path, kind):
    """llama.cpp on our export; an f32 model gets an f32 KV cache too (llama.cpp's default
    cache is f16, which alone moves logits by ~1e-3)."""
    out = path / f"model-{kind}.gguf"
    if not out.exists():
        export_gguf(path, out, kind)
    cache = {"type_k": 0, "type_v": 0} if kind == "f32" else {}  # 0: GGML_TYPE_F32
    with plain_cpu_buffers():
        return llama_cpp.Llama(str(out), n_ctx=256, n_batch=256, logits_all=True, n_threads=2, verbose=False,
                               **cache)


@contextlib.contextmanager
def plain_cpu_buffers():
    """Load without llama.cpp's "extra" CPU buffer types (weights repacked for AMX and other
    kernels): on an AMX Xeon, llama.cpp 0.3.36's repacked q8_0 path crashed the process. The
    oracle is llama.cpp's reference CPU kernels; Llama() exposes no switch for this."""
    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default


def llama_cpp_greedy(llm, prompt, n):
    """Greedy decoding through llama.cpp's own KV cache, token by token; the logits of every
    step are kept."""
    llm.reset()
    llm.eval(prompt)
    tokens, logits = [], []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        logits.append(row)
        tokens.append(int(row.argmax()))
        llm.eval([tokens[-1]])
    return tokens, np.stack(logits)


def lmlab_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].double().numpy()


def test_tokenisation_matches(trained):
    path, _, tok, _ = trained
    llm = load(path, "f32")
    for text in TEXTS:
        ours = tok.encode(text)
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert theirs == ours, text
        assert llm.detokenize(ours, special=True).decode("utf-8") == tok.decode(ours) == text, text
    assert llm.tokenize(b"Hello", add_bos=True, special=True) == tok.encode("Hello", add_bos=True)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_f32_greedy_and_logits_match(trained, prompt):
    path, model, tok, loss = trained
    assert loss < 5.6  # trained: well below uniform's ln(1024) = 6.93
    ids = tok.encode(prompt, add_bos=True)
    ours = generate(model, [ids], N_NEW, temperature=0.0)[0].tokens
    theirs, their_logits = llama_cpp_greedy(load(path, "f32"), ids, N_NEW)
    # A real continuation, not one token repeated (how soon a 200-step model falls into a loop
    # depends on the CPU's float32 kernels; every step's logits are compared below anyway).
    assert len(set(ours)) >= 3
    assert theirs == ours
    # Every step's logits, against lmlab's full forward over the same sequence.
    full = lmlab_logits(model, ids + ours)[len(ids) - 1:-1]
    print(f"f32 {prompt!r}: max |logit diff| {np.abs(full - their_logits).max():.2e}")
    assert np.abs(full - their_logits).max() < 1e-4


def test_q8_0_stays_close(trained, record_property):
    """q8_0 changes the weights, so only closeness is asserted: logits within a small fraction
    of their spread, and most greedy tokens agreeing (the count is reported)."""
    path, model, tok, _ = trained
    llm = load(path, "q8_0")
    agree, total, worst = 0, 0, 0.0
    for prompt in PROMPTS:
        ids = tok.encode(prompt, add_bos=True)
        ours = generate(model, [ids], N_NEW, temperature=0.0)[0].tokens
        llm.reset()
        llm.eval(ids + ours)
        theirs = np.array(llm.scores[:llm.n_tokens], dtype=np.float64)
        full = lmlab_logits(model, ids + ours)
        worst = max(worst, float(np.abs(full - theirs).max() / full.std()))
        their_greedy, _ = llama_cpp_greedy(llm, ids, N_NEW)
        first_diff = next((i for i, (a, b) in enumerate(zip(ours, their_greedy)) if a != b), N_NEW)
        agree += first_diff
        total += N_NEW
    record_property("q8_0_greedy_prefix_agreement", f"{agree}/{total}")
    record_property("q8_0_max_logit_error_over_std", worst)
    print(f"q8_0: greedy prefixes agree on {agree}/{total} tokens; max |logit error| / std = {worst:.4f}")
    assert worst < 0.1
    assert agree >= total // 2


VARIANTS = {
    "tied": dict(tie_embeddings=True),
    "biases": dict(attn_bias=True, attn_out_bias=True, mlp_bias=True),
    "llama3-rope": dict(rope_theta=500000.0,
                        rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                 original_max_seq_len=16)),
    "linear-rope": dict(rope_scaling=RopeScaling("linear", factor=4.0)),
    "head-dim": dict(head_dim=32),
    "mha": dict(n_kv_heads=None),
}


@pytest.fixture(scope="module")
def small_tok():
    return train_tokenizer([t[:3000] for t in embedded_corpus_texts()[:10]], 600)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_give_our_logits(variant, small_tok, tmp_path):
    """Every config feature the export handles, on seeded random weights (norms off 1 and
    biases off 0, so a mix-up in either shows), with 40 unused padding rows: llama.cpp's
    logits over 120 positions equal ours."""
    cfg = replace(get_preset("nano"), vocab_size=640, max_seq_len=256, **VARIANTS[variant])
    model = randomize(build_model(cfg)).eval()
    save_model(model, tmp_path, tokenizer=small_tok)
    llm = load(tmp_path, "f32")
    ids = torch.randint(0, 600, (120,), generator=torch.Generator().manual_seed(1)).tolist()
    llm.reset()
    llm.eval(ids)
    theirs = np.array(llm.scores[:llm.n_tokens], dtype=np.float64)
    ours = lmlab_logits(model, ids)
    assert theirs.shape == ours.shape == (120, 640)
    assert np.abs(ours - theirs).max() < 1e-4 * max(1.0, np.abs(ours).max())
