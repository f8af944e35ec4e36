import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from lmlab.config import get_preset
from lmlab.decode.generate import generate
from lmlab.decode.proxy import proxy_generate
from lmlab.decode.remote import RemoteMember, dense_logprobs
from lmlab.errors import LmlabError
from lmlab.model import build_model


class IdTokenizer:
    vocab_size = 512

    def encode(self, text):
        return [int(text)] if text.isdigit() else [1, 2]


def serve(model, top_k_cap=None):
    """A loopback completions endpoint answering with `model`'s next-token log-probs."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with torch.no_grad():
                lp = model(torch.tensor([body["prompt"]]))[0, -1].log_softmax(-1)
            k = min(body["logprobs"], top_k_cap or lp.numel())
            values, ids = lp.topk(k)
            top = {f"token_id:{i}": v for i, v in zip(ids.tolist(), values.tolist())}
            reply = json.dumps({"choices": [{"logprobs": {"top_logprobs": [top]}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/v1"


def models():
    out = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        out.append(build_model(get_preset("nano")).eval())
    return out


def test_dense_logprobs_spreads_leftover_mass():
    lp = dense_logprobs({0: math.log(0.5), 3: math.log(0.3)}, vocab_size=6)
    assert lp.exp().sum().item() == pytest.approx(1.0)
    assert lp[1].exp().item() == pytest.approx(0.2 / 4)


def test_remote_base_with_full_distribution_equals_local():
    base, expert, anti = models()
    server, url = serve(base)
    try:
        prompts = [[4, 5, 6], [7]]
        remote = RemoteMember(url, "base", IdTokenizer(), prompts, top_k=512)
        got = proxy_generate(remote, expert, anti, prompts, 6)
        want = proxy_generate(base, expert, anti, prompts, 6)
        assert [g.tokens for g in got] == [g.tokens for g in want]
        for g, w in zip(got, want):
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
    finally:
        server.shutdown()


def test_remote_top_k_approximation_keeps_greedy_choice_of_the_member():
    base, expert, _ = models()
    server, url = serve(base, top_k_cap=5)
    try:
        remote = RemoteMember(url, "base", IdTokenizer(), [[4, 5, 6]], top_k=5)
        # expert == anti cancels: the proxy is the remote base alone, whose argmax is in its top 5
        got = proxy_generate(remote, expert, expert, [[4, 5, 6]], 5)[0].tokens
        assert got == generate(base, [[4, 5, 6]], 5)[0].tokens
    finally:
        server.shutdown()


def test_unreachable_endpoint_is_a_clear_error():
    remote = RemoteMember("http://127.0.0.1:9/v1", "x", IdTokenizer(), [[1]], timeout=2)
    with pytest.raises(LmlabError, match="unreachable"):
        remote.prefill()
