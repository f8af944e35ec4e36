"""`lmlab serve` end to end: a real uvicorn server on loopback (port 0), driven by the
official `openai` client and by raw HTTP; outputs checked against `generate()` on the same
model alone and against a direct forward pass."""
import asyncio
import http.client
import json
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from chartok import CharTokenizer  # noqa: E402

from lmlab.config import get_preset  # noqa: E402
from lmlab.data.chat import RoleTokenTemplate  # noqa: E402
from lmlab.decode.generate import generate  # noqa: E402
from lmlab.model import build_model  # noqa: E402
from lmlab.serve.app import ServeConfig, create_app  # noqa: E402
from lmlab.serve.server import build_server  # noqa: E402

TOK = CharTokenizer()
STOPS = {TOK.eos_id, TOK.token_to_id("<|end|>")}
NAME = "tiny"


class Running:
    def __init__(self, app):
        self.app = app
        self.server = build_server(app, "127.0.0.1", 0, "warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                break
            time.sleep(0.01)
        assert self.server.started, "uvicorn did not start"
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def batcher(self):
        return self.app.state.batcher

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)

    def raw(self, method, path, body=None, headers=None, timeout=10):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            payload = resp.read()
            return resp.status, payload
        finally:
            conn.close()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(5)
    cfg = get_preset("nano").replace(vocab_size=TOK.vocab_size, max_seq_len=1024)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def srv(model):
    cfg = ServeConfig(model_name=NAME, max_batch=8, max_queue=128, max_tokens=1000, max_prompt_tokens=600,
                      max_n=4, max_prompts=8, max_body_bytes=50_000)
    running = Running(create_app(model, TOK, cfg))
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def encode_text(text):
    return [TOK.bos_id] + TOK.encode(text)


def solo_text(model, ids, n, stops=(TOK.eos_id,)):
    """What `generate` alone gives: tokens up to the first stop token, and their text."""
    toks = generate(model, [ids], n)[0].tokens
    cut = next((i for i, t in enumerate(toks) if t in stops), None)
    body = toks if cut is None else toks[:cut]
    return body, TOK.decode(body), ("stop" if cut is not None else "length")


# ---- the openai client -----------------------------------------------------------------------

def test_models_and_health(srv, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert srv.raw("GET", "/health")[0] == 200


def test_completion_equals_generate_alone(model, client):
    ids = encode_text("Hello")
    body, text, reason = solo_text(model, ids, 12)
    out = client.completions.create(model=NAME, prompt="Hello", max_tokens=12, temperature=0)
    assert out.choices[0].text == text and out.choices[0].finish_reason == reason
    assert out.usage.prompt_tokens == len(ids)
    # token-id prompts (lm-eval's way), several at once
    other = encode_text("abc")
    out = client.completions.create(model=NAME, prompt=[ids, other], max_tokens=12, temperature=0)
    assert [c.text for c in out.choices] == [text, solo_text(model, other, 12)[1]]


def test_streamed_completion_matches_and_reports_usage(model, client):
    _, text, reason = solo_text(model, encode_text("Stream me"), 20)
    chunks = list(client.completions.create(model=NAME, prompt="Stream me", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(encode_text("Stream me"))


def test_chat_uses_the_template_stream_and_not(model, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = RoleTokenTemplate(TOK).encode_prompt(messages)
    _, text, reason = solo_text(model, ids, 15, STOPS)
    out = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=15, temperature=0)
    assert out.choices[0].message.content == text and out.choices[0].finish_reason == reason
    assert out.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=15, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_chat_logprobs_are_the_models(model, client):
    messages = [{"role": "user", "content": "Score me"}]
    ids = RoleTokenTemplate(TOK).encode_prompt(messages)
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    toks = [TOK.vocab[c.token] for c in content]
    with torch.no_grad():
        lp = model(torch.tensor([ids + toks]))[0].log_softmax(-1)
    for i, c in enumerate(content):
        row = lp[len(ids) - 1 + i]
        assert c.logprob == pytest.approx(float(row[toks[i]]), abs=1e-4)
        assert [t.token for t in c.top_logprobs] == [TOK.inv[j] for j in row.topk(3).indices.tolist()]


def test_echo_gives_prompt_logprobs_of_a_forward_pass(model, client):
    """What lm-eval's local-completions reads for multiple-choice scoring."""
    ids = encode_text("The cat sat")
    out = client.completions.create(model=NAME, prompt=[ids], max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp_block = out.choices[0].logprobs
    with torch.no_grad():
        lp = model(torch.tensor([ids]))[0].log_softmax(-1)
    expected = [float(lp[t - 1, ids[t]]) for t in range(1, len(ids))]
    assert lp_block.token_logprobs[0] is None and lp_block.top_logprobs[0] is None
    assert lp_block.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-5)
    assert lp_block.tokens[:len(ids)] == [TOK.inv[i] for i in ids]
    assert len(lp_block.token_logprobs) == len(ids) + 1  # the prompt, then the one new token
    for t in range(1, len(ids)):  # lm-eval's is_greedy test reads top_logprobs
        greedy = int(lp[t - 1].argmax()) == ids[t]
        assert (lp_block.token_logprobs[t] == max(lp_block.top_logprobs[t].values())) == greedy
    assert out.choices[0].text.startswith(TOK.decode(ids))  # token prompts echo as decoded
    scored = client.completions.create(model=NAME, prompt=[ids], max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].logprobs.token_logprobs == pytest.approx(lp_block.token_logprobs[:len(ids)])


def test_seeded_sampling_is_reproducible_and_n_choices(client):
    kw = dict(model=NAME, prompt="Seed", max_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    a = client.completions.create(**kw, n=3)
    b = client.completions.create(**kw, n=3)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]


def test_64_concurrent_clients_all_complete_correctly(model, srv):
    prompts = [f"q{i}:" for i in range(64)]
    expected = [solo_text(model, encode_text(p), 8)[1] for p in prompts]

    async def main():
        aclient = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=30)

        async def one(i):
            if i % 2:
                out = await aclient.completions.create(model=NAME, prompt=prompts[i], max_tokens=8, temperature=0)
                return out.choices[0].text
            parts = []
            async for c in await aclient.completions.create(model=NAME, prompt=prompts[i], max_tokens=8,
                                                            temperature=0, stream=True):
                parts.append(c.choices[0].text)
            return "".join(parts)

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(64))), timeout=30)
        finally:
            await aclient.close()

    start = time.monotonic()
    texts = asyncio.run(main())
    assert texts == expected
    assert time.monotonic() - start < 30
    assert srv.batcher.active == 0
    assert srv.batcher.stats.peak_active == 8  # they really shared one batch (8 rows here)


# ---- validation --------------------------------------------------------------------------------

C, CH = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
BAD = [
    # (path, body, status, param the error must name (None: message checked), words in the message)
    (C, b"{not json", 400, None, "JSON"),
    (C, b"[1, 2]", 400, None, "object"),
    (C, {"model": NAME}, 400, "prompt", "required"),
    (C, {"model": NAME, "prompt": 5}, 400, "prompt", "prompt"),
    (C, {"model": NAME, "prompt": []}, 400, "prompt", "prompt"),
    (C, {"model": NAME, "prompt": [[]]}, 400, "prompt", "empty"),
    (C, {"model": NAME, "prompt": [1, 99999]}, 400, "prompt", "token id"),
    (C, {"model": NAME, "prompt": "x", "max_tokens": -1}, 400, "max_tokens", "max_tokens"),
    (C, {"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    (C, {"model": NAME, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens", "max_tokens"),
    (C, {"model": NAME, "prompt": "x", "max_tokens": "10"}, 400, "max_tokens", "integer"),
    (C, {"model": NAME, "prompt": "x", "top_p": 2}, 400, "top_p", "top_p"),
    (C, {"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p", "top_p"),
    (C, {"model": NAME, "prompt": "x", "temperature": -1}, 400, "temperature", "temperature"),
    (C, {"model": NAME, "prompt": "x", "temperature": "hot"}, 400, "temperature", "number"),
    (C, {"model": NAME, "prompt": "x", "top_k": 0.5}, 400, "top_k", "top_k"),
    (C, {"model": NAME, "prompt": "x", "min_p": 3}, 400, "min_p", "min_p"),
    (C, {"model": NAME, "prompt": "x", "n": 50}, 400, "n", "max-n"),
    (C, {"model": NAME, "prompt": "x", "n": 0}, 400, "n", "'n'"),
    (C, {"model": NAME, "prompt": "x", "stop": 7}, 400, "stop", "stop"),
    (C, {"model": NAME, "prompt": "x", "stop": [""]}, 400, "stop", "empty"),
    (C, {"model": NAME, "prompt": "x", "logprobs": 100}, 400, "logprobs", "logprobs"),
    (C, {"model": NAME, "prompt": "x", "echo": "yes"}, 400, "echo", "true or false"),
    (C, {"model": NAME, "prompt": "x", "seed": 1.5}, 400, "seed", "seed"),
    (C, {"model": NAME, "prompt": "x", "stream": False, "stream_options": {"include_usage": True}}, 400,
     "stream_options", "stream"),
    (C, {"model": NAME, "prompt": "x", "frequency_penalty": 1.0}, 400, "frequency_penalty", "not supported"),
    (C, {"model": NAME, "prompt": ["a"] * 9}, 400, "prompt", "at most"),
    (C, {"model": NAME, "prompt": "y" * 700}, 400, "prompt", "limit"),
    (C, {"model": NAME, "prompt": "y" * 500, "max_tokens": 900}, 400, "max_tokens", "context"),
    (C, {"model": "gpt-4", "prompt": "x"}, 404, "model", "does not exist"),
    (C, {"model": NAME, "prompt": "z" * 60_000}, 413, None, "limit"),
    (CH, {"model": NAME, "messages": []}, 400, "messages", "non-empty"),
    (CH, {"model": NAME}, 400, "messages", "messages"),
    (CH, {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", "role"),
    (CH, {"model": NAME, "messages": [{"role": "user", "content": 3}]}, 400, "messages", "content"),
    (CH, {"model": NAME, "messages": ["hi"]}, 400, "messages", "object"),
    (CH, {"model": NAME, "messages": MSG, "max_completion_tokens": -5}, 400, "max_completion_tokens", "integer"),
    (CH, {"model": NAME, "messages": MSG, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
    (CH, {"model": NAME, "messages": MSG, "logprobs": 1}, 400, "logprobs", "true or false"),
    (CH, {"model": NAME, "messages": MSG, "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    ("/detokenize", {"tokens": [1, -2]}, 400, "tokens", "token ids"),
    ("/tokenize", {"prompt": 3}, 400, "prompt", "string"),
    ("/v1/nowhere", {}, 404, None, "no route"),
]


@pytest.mark.parametrize("path, body, status, param, words", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_malformed_requests_get_a_4xx_naming_the_reason(srv, path, body, status, param, words):
    got, payload = srv.raw("POST", path, body)
    assert got == status, payload
    err = json.loads(payload)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    assert words.lower() in err["message"].lower()
    assert "Traceback" not in err["message"]


def test_server_is_healthy_after_the_bad_requests(srv, client):
    assert len(BAD) >= 20
    for path, body, *_ in BAD[:12]:  # bounded: a second round straight before the check
        srv.raw("POST", path, body)
    out = client.completions.create(model=NAME, prompt="still ok", max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop")
    assert srv.raw("GET", "/health")[0] == 200


def test_full_queue_is_429(srv):
    b = srv.batcher
    old, b.max_queue = b.max_queue, 0
    try:
        status, payload = srv.raw("POST", C, {"model": NAME, "prompt": "x", "max_tokens": 2})
    finally:
        b.max_queue = old
    assert status == 429 and json.loads(payload)["error"]["code"] == "queue_full"


def test_tokenize_detokenize_metrics(srv):
    status, payload = srv.raw("POST", "/tokenize", {"prompt": "abc"})
    assert status == 200 and json.loads(payload)["tokens"] == encode_text("abc")
    status, payload = srv.raw("POST", "/detokenize", {"tokens": TOK.encode("abc")})
    assert json.loads(payload)["prompt"] == "abc"
    status, payload = srv.raw("GET", "/metrics")
    text = payload.decode()
    assert status == 200
    for name in ("lmlab_requests_running", "lmlab_requests_queued", "lmlab_generation_tokens_total",
                 "lmlab_generation_tokens_per_second"):
        assert f"\n{name} " in "\n" + text
    generated = float(next(line.split()[1] for line in text.splitlines()
                           if line.startswith("lmlab_generation_tokens_total ")))
    assert generated > 0


def test_client_disconnect_mid_stream_frees_the_slot(srv):
    b = srv.batcher
    cancelled = b.stats.requests_cancelled
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    body = json.dumps({"model": NAME, "prompt": "long", "max_tokens": 1000, "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while got.count(b"data:") < 3:  # the stream is flowing
        chunk = sock.recv(4096)
        assert chunk
        got += chunk
    assert b.active == 1
    sock.close()
    deadline = time.monotonic() + 10
    while b.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b.active == 0 and b.running == 0
    assert b.stats.requests_cancelled == cancelled + 1  # freed by the disconnect, not by finishing


# ---- auth and the catch-all ---------------------------------------------------------------------

class Exploding(CharTokenizer):
    def encode(self, text, add_bos=False, add_eos=False):
        if text == "boom":
            raise RuntimeError("secret internal detail")
        return super().encode(text, add_bos, add_eos)


def test_bearer_auth_and_no_stack_trace_reaches_a_client(model):
    running = Running(create_app(model, Exploding(), ServeConfig(model_name=NAME, api_key="s3cret")))
    try:
        status, payload = running.raw("GET", "/v1/models")
        assert status == 401 and json.loads(payload)["error"]["code"] == "invalid_api_key"
        status, _ = running.raw("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert status == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert running.raw("GET", "/v1/models", headers=auth)[0] == 200
        status, payload = running.raw("POST", "/tokenize", {"prompt": "boom"}, headers=auth)
        assert status == 500
        assert b"secret internal detail" not in payload and b"Traceback" not in payload
        assert json.loads(payload)["error"]["type"] == "server_error"
        keyed = openai.OpenAI(base_url=running.url + "/v1", api_key="s3cret", max_retries=0, timeout=30)
        assert keyed.completions.create(model=NAME, prompt="ok", max_tokens=2).choices[0].finish_reason
    finally:
        running.close()


# ---- loading a checkpoint for serving ------------------------------------------------------------

def test_load_for_serving_an_lmlab_checkpoint(tmp_path):
    from lmlab.checkpoint import save_model
    from lmlab.serve.server import load_for_serving
    from lmlab.tokenizer import train_tokenizer

    tok = train_tokenizer(["hello world, héllo wörld"] * 20, vocab_size=300)
    torch.manual_seed(2)
    m = build_model(get_preset("nano").replace(vocab_size=300)).eval()
    save_model(m, tmp_path / "ckpt", tokenizer=tok)
    model, tokenizer, template = load_for_serving(tmp_path / "ckpt")
    assert isinstance(template, RoleTokenTemplate)
    running = Running(create_app(model, tokenizer, ServeConfig(model_name="ckpt"), chat_template=template))
    try:
        c = openai.OpenAI(base_url=running.url + "/v1", api_key="x", max_retries=0, timeout=30)
        ids = [tokenizer.bos_id] + tokenizer.encode("héllo")
        toks = generate(model, [ids], 10)[0].tokens
        cut = next((i for i, t in enumerate(toks) if t == tokenizer.eos_id), len(toks))
        out = c.completions.create(model="ckpt", prompt="héllo", max_tokens=10, temperature=0)
        assert out.choices[0].text == tokenizer.decode(toks[:cut])
        streamed = c.completions.create(model="ckpt", prompt="héllo", max_tokens=10, temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == out.choices[0].text
        chat = c.chat.completions.create(model="ckpt", messages=[{"role": "user", "content": "hello"}],
                                         max_tokens=5, temperature=0)
        assert chat.choices[0].finish_reason in ("stop", "length")
    finally:
        running.close()


def test_a_stored_jinja_chat_template_wins(tmp_path):
    from lmlab.data.chat import JinjaTemplate
    from lmlab.serve.server import chat_template_for

    template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    found = chat_template_for(tmp_path, TOK)
    assert isinstance(found, JinjaTemplate)
    msgs = [{"role": "user", "content": "hi"}]
    assert found.encode_prompt(msgs) == TOK.encode("<|user|>hi<|end|><|assistant|>")
    assert isinstance(chat_template_for(tmp_path / "elsewhere", TOK), RoleTokenTemplate)


def test_a_proxy_tuned_trio_served_as_one_model(model):
    from lmlab.decode.proxy import proxy_generate

    torch.manual_seed(9)
    cfg = model.config
    expert, anti = build_model(cfg).eval(), build_model(cfg).eval()
    running = Running(create_app(model, TOK, ServeConfig(model_name="proxy"), proxy=(expert, anti, 0.5)))
    try:
        c = openai.OpenAI(base_url=running.url + "/v1", api_key="x", max_retries=0, timeout=30)
        ids = encode_text("Proxy")
        toks = proxy_generate(model, expert, anti, [ids], 10, alpha=0.5)[0].tokens
        cut = next((i for i, t in enumerate(toks) if t == TOK.eos_id), len(toks))
        out = c.completions.create(model="proxy", prompt="Proxy", max_tokens=10, temperature=0)
        assert out.choices[0].text == TOK.decode(toks[:cut])
    finally:
        running.close()


def test_load_for_serving_a_hugging_face_directory(tmp_path):
    from lmlab.interop.hf import save_hf
    from lmlab.serve.server import load_for_serving
    from lmlab.tokenizer import train_tokenizer

    tok = train_tokenizer(["some text to learn from"] * 10, vocab_size=300)
    torch.manual_seed(6)
    m = build_model(get_preset("nano").replace(vocab_size=300)).eval()
    save_hf(m, tmp_path / "hf")
    tok.save(tmp_path / "hf" / "tokenizer.json")
    model, tokenizer, _ = load_for_serving(tmp_path / "hf")
    ids = [tokenizer.bos_id] + tokenizer.encode("some")
    assert generate(model, [ids], 6)[0].tokens == generate(m, [ids], 6)[0].tokens


def test_serve_options_are_checked():
    from lmlab.errors import LmlabError

    with pytest.raises(LmlabError, match="max_batch"):
        ServeConfig(max_batch=0)
    with pytest.raises(LmlabError, match="unknown serve option"):
        from lmlab.serve.server import serve

        serve("anything", max_bach=3)
