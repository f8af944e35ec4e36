"""Request validation for the OpenAI-compatible API, as plain functions over the decoded
JSON body: every field is type- and range-checked, and a failure is an `ApiError` whose
message and `param` name the field (the HTTP layer turns it into OpenAI's error shape).

Unknown fields are ignored (clients such as lm-eval send extras); fields we cannot honour
(tools, logit_bias, non-zero penalties, ...) are refused rather than silently dropped."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def number(body: dict, name: str, default: float | None, lo: float, hi: float, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    left = "(" if lo_open else "["
    if not _is_number(v) or v > hi or v < lo or (lo_open and v == lo):
        raise bad(name, f"'{name}' must be a number in {left}{lo}, {hi}], got {v!r}")
    return float(v)


def integer(body: dict, name: str, default: int | None, lo: int, hi: int, hint: str = "") -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or not lo <= v <= hi:
        raise bad(name, f"'{name}' must be an integer in [{lo}, {hi}]{hint}, got {v!r}")
    return v


def boolean(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"'{name}' must be true or false, got {v!r}")
    return v


def string(body: dict, name: str, default: str | None = None) -> str | None:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, str):
        raise bad(name, f"'{name}' must be a string, got {type(v).__name__}")
    return v


def stop_strings(body: dict, max_stop: int) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("stop", f"'stop' must be a string or a list of strings, got {v!r}")
    if len(items) > max_stop:
        raise bad("stop", f"'stop' holds {len(items)} strings; at most {max_stop} are allowed")
    if any(not s for s in items):
        raise bad("stop", "'stop' strings must not be empty")
    return tuple(items)


def unsupported(body: dict, names_and_neutral: dict[str, Any]) -> None:
    """Refuse fields we cannot honour unless they hold their neutral value."""
    for name, neutral in names_and_neutral.items():
        v = body.get(name)
        if v is not None and v != neutral and not (neutral == {} and v == []):
            raise bad(name, f"'{name}' is not supported by this server; leave it out")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (server options)."""
    context: int  # the model's context: prompt + max_tokens must fit
    max_tokens: int
    max_prompt_tokens: int
    max_n: int
    max_prompts: int
    max_logprobs: int = 20
    max_stop: int = 8


@dataclass(frozen=True)
class Sampling:
    """The fields completions and chat share, validated."""
    temperature: float
    top_p: float | None
    top_k: int | None
    min_p: float | None
    repetition_penalty: float | None
    seed: int | None
    n: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def common(body: dict, limits: Limits) -> Sampling:
    unsupported(body, {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "best_of": 1,
                       "suffix": "", "tools": [], "functions": [], "tool_choice": "none"})
    top_k = body.get("top_k")
    if top_k is not None and _is_int(top_k) and top_k in (-1, 0):
        top_k = None  # vLLM's spelling of "no top-k"
    elif top_k is not None:
        top_k = integer(body, "top_k", None, 1, 1 << 30, " (or -1 for none)")
    stream = boolean(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options", f"'stream_options' must be an object, got {options!r}")
        if not stream:
            raise bad("stream_options", "'stream_options' is only allowed with \"stream\": true")
        include_usage = boolean(options, "include_usage")
    return Sampling(
        temperature=number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=number(body, "top_p", None, 0.0, 1.0, lo_open=True),
        top_k=top_k,
        min_p=number(body, "min_p", None, 0.0, 1.0),
        repetition_penalty=number(body, "repetition_penalty", None, 0.0, 10.0, lo_open=True),
        seed=integer(body, "seed", None, -(1 << 63), (1 << 63) - 1),
        n=integer(body, "n", 1, 1, limits.max_n, " (the server's --max-n)"),
        stop=stop_strings(body, limits.max_stop),
        stream=stream,
        include_usage=include_usage,
    )


def prompts(body: dict, encode, vocab_size: int, max_prompts: int) -> list[tuple[list[int], str | None]]:
    """`prompt` as text, list of texts, token ids or list of token-id lists -> [(ids, text)]
    (text None for token prompts)."""
    if "prompt" not in body or body["prompt"] is None:
        raise bad("prompt", "'prompt' is required (a string, a list of strings, or token ids)")
    p = body["prompt"]

    def ids_of(seq: list, where: str) -> list[int]:
        if not seq:
            raise bad("prompt", f"{where} is an empty token list; give at least one token")
        for t in seq:
            if not _is_int(t) or not 0 <= t < vocab_size:
                raise bad("prompt", f"{where} holds {t!r}, not a token id in [0, {vocab_size})")
        return list(seq)

    if isinstance(p, str):
        items: list = [p]
    elif isinstance(p, list) and p and all(_is_int(t) for t in p):
        return [(ids_of(p, "'prompt'"), None)]
    elif isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        items = p
    else:
        raise bad("prompt", "'prompt' must be a string, a list of strings, a list of token ids, or a list "
                            f"of token-id lists, got {type(p).__name__ if not isinstance(p, list) else 'that list'}")
    if len(items) > max_prompts:
        raise bad("prompt", f"'prompt' holds {len(items)} prompts; at most {max_prompts} per request")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = encode(item)
            if not ids:
                raise bad("prompt", f"prompt {i} encodes to no tokens; give some text")
            out.append((ids, item))
        else:
            out.append((ids_of(item, f"prompt {i}"), None))
    return out


CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def messages(body: dict) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad("messages", f"'{where}' must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad("messages", f"'{where}.role' must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise bad("messages", f"'{where}.content' parts must be {{\"type\": \"text\", \"text\": ...}}; "
                                          "only text is supported")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise bad("messages", f"'{where}.content' must be a string or a list of text parts")
        out.append({"role": CHAT_ROLES[role], "content": content})
    return out


def check_fit(n_prompt: int, max_tokens: int, limits: Limits, prompt_param: str, tokens_param: str) -> None:
    if n_prompt > limits.max_prompt_tokens:
        raise bad(prompt_param, f"the prompt is {n_prompt} tokens, more than the server's limit of "
                                f"{limits.max_prompt_tokens}; shorten it", "context_length_exceeded")
    if n_prompt + max(max_tokens, 1) - 1 > limits.context:
        raise bad(tokens_param if n_prompt < limits.context else prompt_param,
                  f"this model's context is {limits.context} tokens, but the prompt ({n_prompt}) plus "
                  f"'{tokens_param}' ({max_tokens}) needs {n_prompt + max_tokens}; shorten the prompt or "
                  f"lower '{tokens_param}'", "context_length_exceeded")


def max_tokens_for(body: dict, name: str, default: int | None, limits: Limits, n_prompt: int,
                   allow_zero: bool = False) -> int:
    """An explicit value is checked as given; the default fills what the context leaves."""
    lo = 0 if allow_zero else 1
    value = integer(body, name, None, lo, limits.max_tokens, " (the server's --max-tokens)")
    if value is None:
        room = limits.context - n_prompt + 1
        value = min(default if default is not None else limits.max_tokens, limits.max_tokens, room)
        if value < 1:
            raise bad("prompt" if name == "max_tokens" else "messages",
                      f"the prompt ({n_prompt} tokens) fills this model's context of {limits.context}; "
                      "shorten it", "context_length_exceeded")
    return value
