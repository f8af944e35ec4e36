"""The static-shape compiled decoding step against the eager engine."""
import pytest
import torch

from lmlab.config import get_preset
from lmlab.decode.generate import Decoder, generate
from lmlab.decode.static import static_step
from lmlab.errors import LmlabError
from lmlab.model import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return build_model(get_preset("nano")).eval()


PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [11], [40, 41, 42]]  # ragged: left padding and masking


@torch.no_grad()
def test_static_step_equals_eager_step_uncompiled(model):
    """The full-cache masked step gives the eager step's logits (run eagerly here, so the
    test is fast; the compiled test below adds torch.compile)."""
    eager, static = Decoder(model, PROMPTS, 6), Decoder(model, PROMPTS, 6)
    tokens_e, tokens_s = eager.prefill().argmax(-1), static.prefill().argmax(-1)
    for _ in range(5):
        le = eager.step(tokens_e)
        slot = torch.tensor([static.cache.length])
        ls = static_step(model, static.cache, tokens_s[:, None], static.next_pos[:, None], slot, static.valid, None)
        static.cache.advance(1)
        static.next_pos = static.next_pos + 1
        torch.testing.assert_close(ls, le, atol=1e-5, rtol=0)
        tokens_e, tokens_s = le.argmax(-1), ls.argmax(-1)


@torch.no_grad()
def test_static_step_sliding_window():
    torch.manual_seed(2)
    model = build_model(get_preset("nano").replace(sliding_window=4)).eval()
    eager, static = Decoder(model, PROMPTS, 6), Decoder(model, PROMPTS, 6)
    tok = eager.prefill().argmax(-1)
    static.prefill()
    for _ in range(5):
        le = eager.step(tok)
        slot = torch.tensor([static.cache.length])
        ls = static_step(model, static.cache, tok[:, None], static.next_pos[:, None], slot, static.valid, 4)
        static.cache.advance(1)
        static.next_pos = static.next_pos + 1
        torch.testing.assert_close(ls, le, atol=1e-5, rtol=0)
        tok = le.argmax(-1)


def test_longrope_is_refused():
    from lmlab.config import RopeScaling

    half = get_preset("nano").dim_per_head // 2
    cfg = get_preset("nano").replace(rope_scaling=RopeScaling("longrope", 4.0, original_max_seq_len=64,
                                                              short_factor=(1.0,) * half, long_factor=(2.0,) * half))
    with pytest.raises(LmlabError, match="longrope"):
        generate(build_model(cfg).eval(), [[1, 2]], 2, compile=True)


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_compiled_greedy_equals_eager(model, quantize):
    import copy

    m = model
    if quantize:
        from lmlab.decode.quant import quantize_model

        m = quantize_model(copy.deepcopy(model), quantize)
    eager = generate(m, PROMPTS, 20)
    compiled = generate(m, PROMPTS, 20, compile=True)
    assert [g.tokens for g in compiled] == [g.tokens for g in eager]
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    again = generate(m, PROMPTS, 17, compile=True)  # same cache bucket: no recompilation needed
    assert [g.tokens for g in again] == [g.tokens[:17] for g in eager]
