"""The OpenAI-compatible HTTP API (FastAPI) over one `Batcher`.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health,
GET /metrics (Prometheus text), POST /tokenize, POST /detokenize, GET /tokenizer_info. Every error a client
sees has OpenAI's shape {"error": {"message", "type", "param", "code"}}; anything
unexpected is logged here and answered with a generic 500, never a stack trace.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmlab.decode.generate import SamplingParams
from lmlab.errors import LmlabError
from lmlab.serve import protocol as P
from lmlab.serve.batcher import Batcher, Failed, Finished, GenParams, PromptLogprobs, QueueFull, Token
from lmlab.serve.config import ServeConfig

log = logging.getLogger("lmlab.serve")
__all__ = ["ServeConfig", "create_app"]


# ---- helpers --------------------------------------------------------------------------------

def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           type: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(P.ApiError(status, message, param, code, type).body(), status_code=status)


async def _read_json(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise P.ApiError(413, f"the request body is {declared} bytes, more than this server's limit of {limit} "
                              "(--max-body-bytes)", None, "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise P.ApiError(413, f"the request body is more than this server's limit of {limit} bytes "
                                  "(--max-body-bytes)", None, "request_too_large")
    try:
        data = json.loads(bytes(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise P.bad(None, f"the request body is not valid JSON ({e})", "invalid_json") from None
    if not isinstance(data, dict):
        raise P.bad(None, f"the request body must be a JSON object, got {type(data).__name__}")
    return data


class _Stream(StreamingResponse):
    """A streaming response that always runs `on_close` when it ends: finished, failed or
    the client gone, so an abandoned request's batch rows are freed at once."""

    def __init__(self, content, on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Job:
    """The engine requests behind one HTTP request, and their events as one async queue."""

    def __init__(self, batcher: Batcher, items: list[tuple[list[int], GenParams]]) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

        def sink_for(k: int):
            def sink(event) -> None:
                loop.call_soon_threadsafe(self.queue.put_nowait, (k, event))
            return sink

        self.open = sum(p.n if p.max_tokens else 1 for _, p in items)
        self.requests = batcher.submit_all([(ids, p, sink_for(k)) for k, (ids, p) in enumerate(items)])

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()

    async def events(self) -> AsyncIterator[tuple[int, Any]]:
        while self.open > 0:
            k, event = await self.queue.get()
            if isinstance(event, Failed):
                raise P.ApiError(500, event.message, None, "generation_failed", "server_error")
            if isinstance(event, Finished):
                self.open -= 1
            yield k, event


class _Choice:
    """One choice's accumulated output."""

    def __init__(self) -> None:
        self.text = ""
        self.tokens: list[int] = []  # reported tokens (a stop token is counted, not shown)
        self.logprobs: list[float] = []
        self.top: list[list[tuple[int, float]] | None] = []
        self.generated = 0
        self.finish_reason: str | None = None

    def add(self, ev) -> None:
        if isinstance(ev, Token):
            self.text += ev.text
            if not ev.is_stop:
                self.tokens.append(ev.token)
                self.logprobs.append(ev.logprob)
                self.top.append(ev.top)
        elif isinstance(ev, Finished):
            self.text += ev.text
            self.generated = ev.tokens
            self.finish_reason = "length" if ev.reason == "length" else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---- the app -------------------------------------------------------------------------------

def create_app(model, tokenizer, config: ServeConfig | None = None, chat_template=None,
               proxy: tuple | None = None) -> FastAPI:
    """An app serving `model` with `tokenizer` (lmlab.tokenizer.Tokenizer or alike).
    `chat_template`: an object with encode_prompt(messages) and stop_ids (lmlab.data.chat);
    default: lmlab's role-token template when the tokenizer has the role tokens.
    `proxy`: (expert, anti_expert, alpha) to serve the proxy-tuned trio as one model."""
    cfg = config or ServeConfig()
    if chat_template is None:
        chat_template = _default_template(tokenizer)
    batcher = Batcher(model, tokenizer.decode, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                      max_len=cfg.max_len, max_prefill_tokens=cfg.max_prefill_tokens, proxy=proxy)
    context = batcher.max_len
    limits = P.Limits(context=context, max_tokens=cfg.max_tokens,
                      max_prompt_tokens=min(cfg.max_prompt_tokens or context, context),
                      max_n=min(cfg.max_n, cfg.max_batch), max_prompts=cfg.max_prompts,
                      max_logprobs=cfg.max_logprobs)
    eos = tuple(i for i in [tokenizer.eos_id] if i is not None)
    chat_stops = tuple(dict.fromkeys(eos + tuple(getattr(chat_template, "stop_ids", ()) or ())))
    created = int(time.time())
    vocab = batcher.vocab
    token_text_cache: dict[int, str] = {}

    def token_text(i: int) -> str:
        if i not in token_text_cache:
            token_text_cache[i] = tokenizer.decode([i])
        return token_text_cache[i]

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.close()

    app = FastAPI(title="lmlab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.config = cfg
    batcher.start()

    # ---- errors ----------------------------------------------------------------------------
    @app.exception_handler(P.ApiError)
    async def api_error(request: Request, exc: P.ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return _error(exc.status_code, message.get(exc.status_code, str(exc.detail)), None,
                      "not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "internal server error; the details were logged on the server", None,
                      "internal_error", "server_error")

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise P.ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                             "invalid_api_key")

    def check_model(body: dict) -> None:
        name = P.string(body, "model")
        if name is not None and name != cfg.model_name:
            raise P.ApiError(404, f"the model {name!r} does not exist; this server serves {cfg.model_name!r}",
                             "model", "model_not_found")

    def sampling_params(s: P.Sampling) -> SamplingParams:
        try:
            return SamplingParams(s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty)
        except LmlabError as e:  # the protocol checks are stricter; this is a backstop
            raise P.bad(None, str(e)) from None

    def start_job(items: list[tuple[list[int], GenParams]]) -> _Job:
        try:
            return _Job(batcher, items)
        except QueueFull as e:
            raise P.ApiError(429, str(e), None, "queue_full", "rate_limit_error") from None
        except LmlabError as e:
            raise P.bad(None, str(e)) from None

    # ---- routes ------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not batcher.alive:
            return _error(503, "the generation engine is not running", None, "unavailable", "server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        st = batcher.stats
        rows = [
            ("lmlab_requests_running", "gauge", "Requests holding batch rows.", batcher.running),
            ("lmlab_requests_queued", "gauge", "Requests waiting for a batch row.", batcher.queued),
            ("lmlab_sequences_running", "gauge", "Sequences (rows) in the running batch.", batcher.active),
            ("lmlab_batch_rows", "gauge", "Batch rows (--max-batch).", batcher.max_batch),
            ("lmlab_prompt_tokens_total", "counter", "Prompt tokens prefilled.", st.prompt_tokens),
            ("lmlab_generation_tokens_total", "counter", "Tokens generated.", st.generated_tokens),
            ("lmlab_requests_finished_total", "counter", "Requests finished.", st.requests_finished),
            ("lmlab_requests_failed_total", "counter", "Requests failed inside the engine.", st.requests_failed),
            ("lmlab_generation_tokens_per_second", "gauge", "Tokens generated per second, last 10 s.",
             round(st.tokens_per_second(), 3)),
        ]
        lines = []
        for name, kind, help_, value in rows:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": cfg.model_name, "object": "model", "created": created, "owned_by": "lmlab",
                "max_model_len": context}

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str, request: Request):
        authorize(request)
        if name != cfg.model_name:
            raise P.ApiError(404, f"the model {name!r} does not exist; this server serves {cfg.model_name!r}",
                             "model", "model_not_found")
        return model_card()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        authorize(request)
        body = await _read_json(request, cfg.max_body_bytes)
        check_model(body)
        if "messages" in body:
            if chat_template is None:
                raise P.bad("messages", "this model has no chat template; tokenize a 'prompt' instead")
            ids = chat_template.encode_prompt(P.messages(body))
        else:
            text = P.string(body, "prompt")
            if text is None:
                raise P.bad("prompt", "'prompt' (a string) or 'messages' is required")
            ids = encode(text, P.boolean(body, "add_special_tokens", True))
        return {"tokens": ids, "count": len(ids), "max_model_len": context}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        authorize(request)
        body = await _read_json(request, cfg.max_body_bytes)
        check_model(body)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                and 0 <= t < vocab for t in ids):
            raise P.bad("tokens", f"'tokens' must be a list of token ids in [0, {vocab})")
        return {"prompt": tokenizer.decode(ids)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        # vLLM's route: lm-eval's `local-completions` finds it and then tokenizes through
        # /tokenize, so it needs no local copy of the tokenizer.
        authorize(request)

        def text_of(i):
            return token_text(i) if i is not None else None

        return {"bos_token": text_of(tokenizer.bos_id), "eos_token": text_of(tokenizer.eos_id),
                "pad_token": text_of(getattr(tokenizer, "pad_id", None)), "model_max_length": context,
                "vocab_size": vocab}

    def encode(text: str, add_bos: bool = True) -> list[int]:
        ids = tokenizer.encode(text)
        bos = tokenizer.bos_id
        return [bos] + ids if add_bos and bos is not None else ids

    # ---- completions ---------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        body = await _read_json(request, cfg.max_body_bytes)
        check_model(body)
        s = P.common(body, limits)
        prompts = P.prompts(body, encode, vocab, limits.max_prompts)
        echo = P.boolean(body, "echo")
        k = P.integer(body, "logprobs", None, 0, limits.max_logprobs, " (the server's --max-logprobs)")
        sp = sampling_params(s)
        items = []
        for i, (ids, _) in enumerate(prompts):
            max_tokens = P.max_tokens_for(body, "max_tokens", cfg.default_max_tokens, limits, len(ids),
                                          allow_zero=echo)
            P.check_fit(len(ids), max_tokens, limits, "prompt", "max_tokens")
            items.append((ids, GenParams(max_tokens=max_tokens, sampling=sp, seed=s.seed, stop=s.stop,
                                         stop_ids=eos, logprobs=k, n=s.n,
                                         prompt_logprobs=(k or 0) if echo and k is not None else None)))
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_texts = [text if text is not None else tokenizer.decode(ids) for ids, text in prompts]
        n_prompt = sum(len(ids) for ids, _ in prompts)
        job = start_job(items)

        def choice_index(k_: int, choice: int) -> int:
            return k_ * s.n + choice

        def lp_block(tokens, lps, tops, offset0: int) -> dict:
            strs = [token_text(t) for t in tokens]
            offsets, pos = [], offset0
            for t in strs:
                offsets.append(pos)
                pos += len(t)
            top_dicts = []
            for t, lp, top in zip(tokens, lps, tops):
                if top is None and lp is None:
                    top_dicts.append(None)
                    continue
                d = {token_text(t): lp}
                for alt, alt_lp in top or []:
                    d.setdefault(token_text(alt), alt_lp)
                top_dicts.append(d)
            return {"tokens": strs, "token_logprobs": lps, "top_logprobs": top_dicts, "text_offset": offsets}

        def prompt_block(k_: int, plp: PromptLogprobs | None) -> dict | None:
            if plp is None:
                return None
            ids = prompts[k_][0]
            tops = plp.top if plp.top is not None else [[] if lp is not None else None for lp in plp.logprobs]
            return lp_block(ids, plp.logprobs, tops, 0)

        if s.stream:
            return _Stream(stream_completion(job, rid, now, choice_index, prompt_texts, prompt_block, lp_block,
                                             echo, k, n_prompt, s.include_usage), job.cancel)
        try:
            choices: dict[int, _Choice] = {}
            plps: dict[int, PromptLogprobs] = {}
            async for k_, ev in job.events():
                if isinstance(ev, PromptLogprobs):
                    plps[k_] = ev
                    continue
                choices.setdefault(choice_index(k_, ev.choice), _Choice()).add(ev)
        finally:
            job.cancel()  # no-op once finished; frees rows if this handler is cancelled
        out = []
        completion_tokens = 0
        for k_ in range(len(prompts)):
            for c in range(s.n):
                idx = choice_index(k_, c)
                ch = choices.get(idx) or choices[choice_index(k_, 0)]  # max_tokens 0: one shared choice
                completion_tokens += ch.generated
                text = (prompt_texts[k_] if echo else "") + ch.text
                logprobs = None
                if k is not None:
                    gen = lp_block(ch.tokens, ch.logprobs, ch.top, len(prompt_texts[k_]))
                    if echo:
                        pb = prompt_block(k_, plps.get(k_))
                        gen = {key: pb[key] + gen[key] for key in gen}
                    logprobs = gen
                out.append({"index": idx, "text": text, "logprobs": logprobs, "finish_reason": ch.finish_reason})
        return {"id": rid, "object": "text_completion", "created": now, "model": cfg.model_name,
                "choices": out, "usage": _usage(n_prompt, completion_tokens)}

    async def stream_completion(job, rid, now, choice_index, prompt_texts, prompt_block, lp_block, echo, k,
                                n_prompt, include_usage):
        def chunk(choices: list, usage=None) -> str:
            obj = {"id": rid, "object": "text_completion", "created": now, "model": cfg.model_name,
                   "choices": choices}
            if include_usage:
                obj["usage"] = usage
            return _sse(obj)

        completion_tokens = 0
        offsets: dict[int, int] = {}
        try:
            async for k_, ev in job.events():
                if isinstance(ev, PromptLogprobs):
                    if echo:
                        for c in range(job.requests[k_].params.n):
                            idx = choice_index(k_, c)
                            offsets[idx] = len(prompt_texts[k_])
                            yield chunk([{"index": idx, "text": prompt_texts[k_],
                                          "logprobs": prompt_block(k_, ev) if k is not None else None,
                                          "finish_reason": None}])
                    continue
                idx = choice_index(k_, ev.choice)
                if isinstance(ev, Token):
                    if ev.is_stop:
                        continue
                    lp = None
                    if k is not None:
                        base = offsets.get(idx, len(prompt_texts[k_]))
                        lp = lp_block([ev.token], [ev.logprob], [ev.top], base)
                        offsets[idx] = base + len(token_text(ev.token))
                    yield chunk([{"index": idx, "text": ev.text, "logprobs": lp, "finish_reason": None}])
                else:  # Finished
                    completion_tokens += ev.tokens
                    reason = "length" if ev.reason == "length" else "stop"
                    yield chunk([{"index": idx, "text": ev.text, "logprobs": None, "finish_reason": reason}])
            if include_usage:
                yield chunk([], _usage(n_prompt, completion_tokens))
        except P.ApiError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    # ---- chat ------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        body = await _read_json(request, cfg.max_body_bytes)
        check_model(body)
        if chat_template is None:
            raise P.bad("messages", "this model has no chat template (its tokenizer has no role tokens and "
                                    "no chat_template); use /v1/completions", "no_chat_template")
        s = P.common(body, limits)
        msgs = P.messages(body)
        want_lp = P.boolean(body, "logprobs")
        top_n = P.integer(body, "top_logprobs", None, 0, limits.max_logprobs, " (the server's --max-logprobs)")
        if top_n is not None and not want_lp:
            raise P.bad("top_logprobs", "'top_logprobs' needs \"logprobs\": true")
        try:
            ids = chat_template.encode_prompt(msgs)
        except LmlabError as e:
            raise P.bad("messages", str(e)) from None
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = P.max_tokens_for(body, name, None, limits, len(ids))
        P.check_fit(len(ids), max_tokens, limits, "messages", name)
        params = GenParams(max_tokens=max_tokens, sampling=sampling_params(s), seed=s.seed, stop=s.stop,
                           stop_ids=chat_stops, logprobs=(top_n or 0) if want_lp else None, n=s.n)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        job = start_job([(ids, params)])

        def lp_content(tokens, lps, tops) -> list[dict]:
            out = []
            for t, lp, top in zip(tokens, lps, tops):
                text = token_text(t)
                out.append({"token": text, "logprob": lp, "bytes": list(text.encode()),
                            "top_logprobs": [{"token": token_text(a), "logprob": v,
                                              "bytes": list(token_text(a).encode())} for a, v in top or []]})
            return out

        if s.stream:
            return _Stream(stream_chat(job, rid, now, s.n, want_lp, lp_content, len(ids), s.include_usage),
                           job.cancel)
        try:
            choices = [_Choice() for _ in range(s.n)]
            async for _, ev in job.events():
                choices[ev.choice].add(ev)
        finally:
            job.cancel()
        out = [{"index": i, "message": {"role": "assistant", "content": c.text},
                "logprobs": {"content": lp_content(c.tokens, c.logprobs, c.top)} if want_lp else None,
                "finish_reason": c.finish_reason} for i, c in enumerate(choices)]
        return {"id": rid, "object": "chat.completion", "created": now, "model": cfg.model_name,
                "choices": out, "usage": _usage(len(ids), sum(c.generated for c in choices))}

    async def stream_chat(job, rid, now, n, want_lp, lp_content, n_prompt, include_usage):
        def chunk(choices: list, usage=None) -> str:
            obj = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": cfg.model_name,
                   "choices": choices}
            if include_usage:
                obj["usage"] = usage
            return _sse(obj)

        completion_tokens = 0
        try:
            for i in range(n):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            async for _, ev in job.events():
                if isinstance(ev, Token):
                    if ev.is_stop:
                        continue
                    lp = {"content": lp_content([ev.token], [ev.logprob], [ev.top])} if want_lp else None
                    yield chunk([{"index": ev.choice, "delta": {"content": ev.text}, "logprobs": lp,
                                  "finish_reason": None}])
                elif isinstance(ev, Finished):
                    completion_tokens += ev.tokens
                    delta = {"content": ev.text} if ev.text else {}
                    reason = "length" if ev.reason == "length" else "stop"
                    yield chunk([{"index": ev.choice, "delta": delta, "logprobs": None, "finish_reason": reason}])
            if include_usage:
                yield chunk([], _usage(n_prompt, completion_tokens))
        except P.ApiError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    return app


def _default_template(tokenizer):
    from lmlab.data.chat import RoleTokenTemplate

    try:
        return RoleTokenTemplate(tokenizer)
    except LmlabError:
        return None
