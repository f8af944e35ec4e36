"""A proxy-tuning member behind an OpenAI-compatible completions endpoint: a model whose
weights we cannot see, known only through next-token log-probabilities (the paper's
motivating case).

Protocol: POST {base_url}/completions with
    {"model": NAME, "prompt": [token ids], "max_tokens": 1, "temperature": 0,
     "logprobs": TOP_K, "return_tokens_as_token_ids": true}
and read `choices[0].logprobs.top_logprobs[0]`, a {token: logprob} map whose keys are
"token_id:N" (vLLM's `return_tokens_as_token_ids`) or token strings, mapped to ids with the
shared tokenizer.

Approximation when only the top-k are returned: the remaining probability mass
1 − Σ top-k is spread evenly over the other V − k tokens (never below `floor`, a log-prob).
With k = V this is exact. The endpoint recomputes the whole context each step, as a black
box must: expect one HTTP request per row per token.
"""
from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from typing import Sequence

import torch

from lmlab.errors import LmlabError


def dense_logprobs(top: dict[int, float], vocab_size: int, floor: float = -30.0) -> torch.Tensor:
    """(V,) log-probs from a sparse top-k map, the rest sharing the leftover mass evenly."""
    out = torch.empty(vocab_size)
    known = torch.tensor(list(top.values()), dtype=torch.float64)
    rest = vocab_size - len(top)
    leftover = 1.0 - float(known.exp().sum()) if len(top) else 1.0
    fill = math.log(leftover / rest) if rest and leftover > 0 else floor
    out.fill_(max(fill, floor))
    for token, lp in top.items():
        out[token] = lp
    return out


class RemoteMember:
    """prefill()/step() like a local Decoder, answering from an HTTP endpoint."""

    def __init__(self, base_url: str, model: str, tokenizer, prompts: Sequence[Sequence[int]],
                 top_k: int = 20, floor: float = -30.0, timeout: float = 60.0, api_key: str | None = None) -> None:
        self.url = base_url.rstrip("/") + "/completions"
        self.model_name, self.tokenizer = model, tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.contexts = [list(p) for p in prompts]
        self.top_k, self.floor, self.timeout, self.api_key = top_k, floor, timeout, api_key

    def _token_id(self, key: str) -> int:
        if key.startswith("token_id:"):
            return int(key.split(":", 1)[1])
        ids = self.tokenizer.encode(key)
        if len(ids) != 1:
            raise LmlabError(
                f"{self.url} returned the token {key!r}, which is not one token of the shared tokenizer; "
                "ask the server for token ids (return_tokens_as_token_ids) or use the same tokenizer"
            )
        return ids[0]

    def _request(self, context: list[int]) -> torch.Tensor:
        body = json.dumps({"model": self.model_name, "prompt": context, "max_tokens": 1, "temperature": 0,
                           "logprobs": self.top_k, "return_tokens_as_token_ids": True}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())
            top = reply["choices"][0]["logprobs"]["top_logprobs"][0]
        except urllib.error.URLError as e:
            raise LmlabError(f"remote member {self.url} is unreachable ({e}); check the URL and that it is running") from None
        except (KeyError, IndexError, TypeError, json.JSONDecodeError):
            raise LmlabError(
                f"{self.url} did not return next-token log-probs (choices[0].logprobs.top_logprobs[0]); "
                "it must support the completions API with `logprobs`"
            ) from None
        return dense_logprobs({self._token_id(k): float(v) for k, v in top.items()}, self.vocab_size, self.floor)

    def prefill(self) -> torch.Tensor:
        return torch.stack([self._request(c) for c in self.contexts])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        for context, t in zip(self.contexts, tokens.tolist()):
            context.append(int(t))
        return self.prefill()
