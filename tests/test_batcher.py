"""The continuous-batching engine: a request's tokens through the shared, changing batch
equal `generate()` on that request alone."""
import threading
import time

import pytest
import torch

from lmlab.config import get_preset
from lmlab.decode.generate import SamplingParams, generate
from lmlab.errors import LmlabError
from lmlab.model import build_model
from lmlab.serve.batcher import Batcher, Finished, GenParams, QueueFull, Token, collect


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return build_model(get_preset("nano")).eval()


def decode(ids):
    return " ".join(map(str, ids))


def run_until_idle(b, limit=2000):
    for _ in range(limit):
        if not b.seqs and not b.queued:
            return
        b.step()
    raise AssertionError("batcher did not drain")


@pytest.fixture(scope="module")
def windowed():
    torch.manual_seed(4)
    return build_model(get_preset("nano").replace(sliding_window=6)).eval()


@pytest.mark.parametrize("which", ["model", "windowed"])
def test_join_and_leave_mid_way_equals_generate_alone(which, request):
    """Requests arrive at different steps and have different lengths, so the batch grows
    and shrinks while each one runs; every request still gets exactly its solo tokens
    (with a sliding window too)."""
    model = request.getfixturevalue(which)
    b = Batcher(model, decode, max_batch=4)
    prompts = [[5, 17, 300, 2, 9], [11], [40, 41, 42, 43, 44, 45, 46, 47], [7, 8], [100, 3, 99], [1, 2, 3, 4]]
    lengths = [12, 5, 9, 15, 3, 8]
    events = {i: [] for i in range(len(prompts))}
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4], 7: [5]}  # step -> requests submitted before it
    seen_active = []
    with torch.inference_mode():
        for step in range(200):
            for i in arrivals.get(step, []):
                b.submit(prompts[i], GenParams(max_tokens=lengths[i]), events[i].append)
            if not b.seqs and not b.queued and step > max(arrivals):
                break
            b.step()
            seen_active.append(b.active)
    assert max(seen_active) == 4 and min(seen_active[:10]) < 4  # the batch really changed size
    for i, p in enumerate(prompts):
        solo = generate(model, [p], lengths[i])[0]
        toks = [e.token for e in events[i] if isinstance(e, Token)]
        lps = [e.logprob for e in events[i] if isinstance(e, Token)]
        assert toks == solo.tokens, i
        assert lps == pytest.approx(solo.logprobs, abs=1e-4)
        assert isinstance(events[i][-1], Finished) and events[i][-1].reason == "length"
    assert b.active == 0 and b.running == 0


def test_seeded_sampling_equals_generate_alone(model):
    b = Batcher(model, decode, max_batch=3)
    sp = SamplingParams(temperature=0.9, top_k=40, top_p=0.95)
    b.submit([9, 9, 9], GenParams(max_tokens=20), lambda e: None)  # a neighbour in the batch
    out = []
    b.submit([1, 2, 3], GenParams(max_tokens=10, sampling=sp, seed=7), out.append)
    with torch.inference_mode():
        run_until_idle(b)
    solo = generate(model, [[1, 2, 3]], 10, temperature=0.9, top_k=40, top_p=0.95, seed=7)[0]
    assert [e.token for e in out if isinstance(e, Token)] == solo.tokens


def varied_prompt(model):
    """A prompt whose greedy continuation starts with 4 different tokens (a random model
    often repeats one token, which would make the stop checks vacuous)."""
    for start in range(1, 200):
        prompt = [start, start + 7, start + 50]
        free = generate(model, [prompt], 8)[0].tokens
        if len(set(free[:4])) == 4:
            return prompt, free
    raise AssertionError("no varied prompt found")


def test_stop_ids_stop_strings_and_n(model):
    prompt, free = varied_prompt(model)
    b = Batcher(model, decode, max_batch=4).start()
    try:
        choices, _ = collect(b, prompt, GenParams(max_tokens=8, stop_ids=(free[2],)))
        assert choices[0].tokens == free[:3] and choices[0].finish_reason == "eos"
        assert choices[0].text == decode(free[:2])  # the stop token adds no text
        choices, _ = collect(b, prompt, GenParams(max_tokens=8, stop=(" " + str(free[3]),)))
        assert choices[0].finish_reason == "stop" and choices[0].text == decode(free[:3])
        choices, _ = collect(b, prompt, GenParams(max_tokens=6, n=3))
        assert [c.tokens for c in choices] == [free[:6]] * 3
    finally:
        b.close()


def test_prompt_logprobs_match_a_forward_pass(model):
    prompt = [3, 14, 15, 92, 65]
    b = Batcher(model, decode, max_batch=2).start()
    try:
        _, plp = collect(b, prompt, GenParams(max_tokens=0, prompt_logprobs=2))
    finally:
        b.close()
    with torch.no_grad():
        lp = model(torch.tensor([prompt]))[0].log_softmax(-1)
    expected = [float(lp[t - 1, prompt[t]]) for t in range(1, len(prompt))]
    assert plp.logprobs[0] is None and plp.logprobs[1:] == pytest.approx(expected, abs=1e-5)
    assert plp.top[1][0][0] == int(lp[0].argmax())


def test_limits(model):
    b = Batcher(model, decode, max_batch=2, max_queue=1)
    with pytest.raises(LmlabError, match="context"):
        b.submit([1] * 100, GenParams(max_tokens=100), lambda e: None)
    with pytest.raises(LmlabError, match="vocabulary"):
        b.submit([1, 10_000], GenParams(), lambda e: None)
    with pytest.raises(LmlabError, match="n=3"):
        b.submit([1], GenParams(n=3), lambda e: None)
    b.submit([1], GenParams(), lambda e: None)
    with pytest.raises(QueueFull):
        b.submit([1], GenParams(), lambda e: None)


def test_cancel_frees_the_row_and_threads_drain(model):
    b = Batcher(model, decode, max_batch=2).start()
    try:
        got = threading.Event()
        req = b.submit([1, 2], GenParams(max_tokens=100), lambda e: got.set())
        assert got.wait(10)
        req.cancel()
        deadline = time.monotonic() + 10
        while (b.active or b.running) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.active == 0 and b.running == 0
    finally:
        b.close()


def test_a_proxy_tuned_trio_equals_proxy_generate_alone(model):
    from lmlab.decode.proxy import proxy_generate

    torch.manual_seed(8)
    expert = build_model(get_preset("nano")).eval()
    anti = build_model(get_preset("nano")).eval()
    b = Batcher(model, decode, max_batch=3, proxy=(expert, anti, 0.7))
    prompts, lengths = [[5, 6, 7], [1], [9, 8, 7, 6, 5]], [10, 4, 7]
    events = {i: [] for i in range(3)}
    with torch.inference_mode():
        b.submit(prompts[0], GenParams(max_tokens=lengths[0]), events[0].append)
        b.step()
        b.step()
        for i in (1, 2):  # join mid-way
            b.submit(prompts[i], GenParams(max_tokens=lengths[i], prompt_logprobs=0), events[i].append)
        run_until_idle(b)
    for i, p in enumerate(prompts):
        solo = proxy_generate(model, expert, anti, [p], lengths[i], alpha=0.7)[0]
        toks = [e.token for e in events[i] if isinstance(e, Token)]
        assert toks == solo.tokens, i
        assert [e.logprob for e in events[i] if isinstance(e, Token)] == pytest.approx(solo.logprobs, abs=1e-4)
    from lmlab.decode.proxy import proxy_scores
    from lmlab.serve.batcher import PromptLogprobs

    plp = next(e for e in events[2] if isinstance(e, PromptLogprobs))
    x = torch.tensor([prompts[2]])
    with torch.no_grad():
        lp = proxy_scores(model(x)[0], expert(x)[0], anti(x)[0], alpha=0.7).log_softmax(-1)
    expected = [float(lp[t - 1, prompts[2][t]]) for t in range(1, len(prompts[2]))]
    assert plp.logprobs[0] is None and plp.logprobs[1:] == pytest.approx(expected, abs=1e-5)
