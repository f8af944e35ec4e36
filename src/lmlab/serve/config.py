"""Server options (`lmlab serve --...`), importable without the HTTP stack."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    model_name: str = "lmlab"
    api_key: str | None = None  # when set, /v1/*, /tokenize and /detokenize need "Bearer <key>"
    max_batch: int = 32  # sequences decoded together (1: one request at a time)
    max_queue: int = 256  # requests waiting for a batch row before 429
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 16  # completions without max_tokens (OpenAI's default)
    max_prompt_tokens: int | None = None  # default: the model's context
    max_n: int = 8
    max_prompts: int = 32  # prompts in one completions request
    max_logprobs: int = 20
    max_body_bytes: int = 1 << 20
    max_prefill_tokens: int = 4096
    max_len: int | None = None  # cache length per row; default: the model's context

    def __post_init__(self) -> None:
        from lmlab.errors import LmlabError

        for name in ("max_batch", "max_queue", "max_tokens", "default_max_tokens", "max_n", "max_prompts",
                     "max_body_bytes", "max_prefill_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LmlabError(f"serve option {name} must be an integer >= 1, got {value!r}")
        for name in ("max_prompt_tokens", "max_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise LmlabError(f"serve option {name} must be an integer >= 1 (or unset), got {value!r}")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise LmlabError(f"serve option max_logprobs must be an integer >= 0, got {self.max_logprobs!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise LmlabError("serve option api_key is empty; give a key or leave it unset")
