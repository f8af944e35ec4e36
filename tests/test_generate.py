import math

import pytest
import torch

from lmlab.config import get_preset
from lmlab.decode.generate import generate, stream
from lmlab.decode.sampling import apply_min_p, apply_repetition_penalty, apply_top_k, apply_top_p
from lmlab.errors import LmlabError
from lmlab.model import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return build_model(get_preset("nano")).eval()


def greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_with_cache_equals_without(model):
    prompt = [5, 17, 300, 2, 9]
    out = generate(model, [prompt], 12)[0]
    assert out.tokens == greedy_without_cache(model, prompt, 12)
    assert out.finish_reason == "length"


def test_ragged_batch_equals_one_by_one(model):
    prompts = [[3, 4, 5, 6, 7, 8, 9], [11], [40, 41, 42]]
    batched = generate(model, prompts, 10)
    for p, g in zip(prompts, batched):
        single = generate(model, [p], 10)[0]
        assert g.tokens == single.tokens
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(single.logprobs), atol=1e-5, rtol=0)


def test_logprobs_are_the_models(model):
    prompt = [1, 2, 3]
    g = generate(model, [prompt], 3)[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + g.tokens]))[0]
    expected = [float(logits[len(prompt) - 1 + i].log_softmax(-1)[t]) for i, t in enumerate(g.tokens)]
    assert g.logprobs == pytest.approx(expected, abs=1e-5)


def test_sampling_is_deterministic_under_a_seed(model):
    kw = dict(temperature=1.0, top_k=50, seed=123)
    a = generate(model, [[1, 2], [3]], 15, **kw)
    b = generate(model, [[1, 2], [3]], 15, **kw)
    c = generate(model, [[1, 2], [3]], 15, **{**kw, "seed": 124})
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in c]


def test_eos_finishes_a_row_and_others_continue(model):
    prompt = [5, 17, 300]
    free = generate(model, [prompt], 8)[0].tokens
    eos = free[2]
    out = generate(model, [prompt, [7, 7]], 8, eos_id=eos)
    assert out[0].tokens == free[:3] and out[0].finish_reason == "eos"
    assert len(out[1].tokens) <= 8


def test_stop_strings_cut_the_text(model):
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    prompt = [5, 17, 300]
    free = generate(model, [prompt], 8)[0].tokens
    stop = str(free[3])
    g = generate(model, [prompt], 8, stop=[" " + stop], decode=decode)[0]
    assert g.finish_reason == "stop" and g.tokens == free[:4]
    assert g.text == " ".join(map(str, free[:3]))
    with pytest.raises(LmlabError, match="decode"):
        generate(model, [prompt], 2, stop=["x"])


def test_stream_yields_each_step(model):
    steps = list(stream(model, [[1, 2, 3]], 4))
    assert [s.index for s in steps] == [0, 1, 2, 3]
    assert [s.tokens[0] for s in steps] == generate(model, [[1, 2, 3]], 4)[0].tokens


def test_context_overflow_is_refused(model):
    with pytest.raises(LmlabError, match="context"):
        generate(model, [[1] * 100], 100)


# ---- processors against hand-computed distributions --------------------------------------

LOGITS = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))


def kept(logits):
    return torch.isfinite(logits)[0].tolist()


def test_top_k_keeps_the_k_largest():
    assert kept(apply_top_k(LOGITS, 2)) == [True, True, False, False, False]


def test_top_p_keeps_smallest_set_reaching_p():
    assert kept(apply_top_p(LOGITS, 0.7)) == [True, True, False, False, False]  # 0.5 + 0.2 = 0.7
    assert kept(apply_top_p(LOGITS, 0.71)) == [True, True, True, False, False]
    assert kept(apply_top_p(LOGITS, 0.01)) == [True, False, False, False, False]
    shuffled = LOGITS[:, [3, 0, 4, 1, 2]]
    assert kept(apply_top_p(shuffled, 0.7)) == [False, True, False, True, False]


def test_min_p_is_relative_to_the_top_token():
    assert kept(apply_min_p(LOGITS, 0.3)) == [True, True, True, False, False]  # >= 0.15


def test_repetition_penalty_ctrl_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_sampled_frequencies_follow_top_k_distribution():
    from lmlab.decode.sampling import process_logits, sample

    g = torch.Generator().manual_seed(0)
    logits = LOGITS.expand(20000, 5)
    draws = sample(process_logits(logits, 1.0, top_k=2), 1.0, g)
    freq = torch.bincount(draws, minlength=5).float() / 20000
    assert freq[2:].sum() == 0
    assert math.isclose(float(freq[0]), 0.5 / 0.7, abs_tol=0.015)


# ---- sampling parameters are validated before they reach the sampler ------------------

@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 2}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
])
def test_bad_sampling_params_name_the_field(model, kwargs, field):
    from lmlab.decode.generate import SamplingParams

    with pytest.raises(LmlabError, match=field):
        SamplingParams(**kwargs)
    with pytest.raises(LmlabError, match=field):
        generate(model, [[1, 2]], 2, **kwargs)


@pytest.mark.parametrize("n", [0, -3, 1.5, True])
def test_bad_max_new_tokens_is_refused(model, n):
    with pytest.raises(LmlabError, match="max_new_tokens"):
        generate(model, [[1, 2]], n)
