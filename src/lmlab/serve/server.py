"""Load a checkpoint and serve it: `serve(...)` is what `lmlab serve MODEL` calls."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.serve.config import ServeConfig

log = logging.getLogger("lmlab.serve")


def chat_template_for(model_dir: str | Path, tokenizer):
    """The checkpoint's own chat template: a stored Jinja template (chat_template.jinja or
    tokenizer_config.json's chat_template) first, else lmlab's role tokens, else None."""
    from lmlab.data.chat import JinjaTemplate, RoleTokenTemplate
    from lmlab.io import read_json

    d = Path(model_dir)
    if d.is_file():
        d = d.parent
    config_path = d / "tokenizer_config.json"
    config = read_json(config_path, "") if config_path.is_file() else {}

    def token_text(value) -> str:
        return value.get("content", "") if isinstance(value, dict) else (value or "")

    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return JinjaTemplate(jinja.read_text(encoding="utf-8"), tokenizer, token_text(config.get("bos_token")),
                             token_text(config.get("eos_token")))
    if config.get("chat_template"):
        return JinjaTemplate.from_tokenizer_config(config_path, tokenizer)
    try:
        return RoleTokenTemplate(tokenizer)
    except LmlabError:
        return None


def load_for_serving(model_spec: str | Path, tokenizer_path: str | Path | None = None,
                     device: str = "cpu", dtype=None):
    """(model, tokenizer, chat template) from an lmlab or Hugging Face checkpoint directory."""
    from lmlab import load_model
    from lmlab.tokenizer import Tokenizer

    model = load_model(model_spec, device=device, dtype=dtype).eval()
    tok_source = tokenizer_path or model_spec
    tokenizer = Tokenizer.load(tok_source)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise LmlabError(
            f"the tokenizer ({tokenizer.vocab_size} tokens) is larger than the model's vocabulary "
            f"({model.config.vocab_size}); pass the tokenizer the model was trained with (--tokenizer)")
    return model, tokenizer, chat_template_for(tok_source, tokenizer)


def build_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    try:
        import uvicorn
    except ImportError:  # pragma: no cover - the serve extra
        raise LmlabError("serving needs uvicorn and fastapi: pip install 'lmlab[serve]'") from None
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def serve(model_spec: str | Path, host: str = "127.0.0.1", port: int = 8000, *,
          tokenizer: str | Path | None = None, device: str = "cpu", dtype=None,
          model_name: str | None = None, log_level: str = "info", expert: str | Path | None = None,
          anti_expert: str | Path | None = None, alpha: float = 1.0, **options) -> None:
    """Serve a checkpoint until interrupted. `options` are ServeConfig fields
    (api_key, max_batch, max_queue, max_tokens, max_n, max_body_bytes, ...).
    With `expert` and `anti_expert`, MODEL is the base of a proxy-tuned trio served as one
    model (all three must share the tokenizer)."""
    known = {f.name for f in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise LmlabError(f"unknown serve option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        from lmlab.serve.app import create_app
    except ImportError:
        raise LmlabError("serving needs FastAPI and uvicorn: pip install 'lmlab[serve]'") from None
    if (expert is None) != (anti_expert is None):
        raise LmlabError("proxy-tuning needs both --expert and --anti-expert (or neither)")
    model, tok, template = load_for_serving(model_spec, tokenizer, device, dtype)
    proxy = None
    if expert is not None:
        from lmlab import load_model

        proxy = (load_model(expert, device=device, dtype=dtype), load_model(anti_expert, device=device, dtype=dtype),
                 float(alpha))
    name = model_name or Path(model_spec).name
    app = create_app(model, tok, ServeConfig(model_name=name, **options), chat_template=template, proxy=proxy)
    log.info("serving %s on http://%s:%d (chat template: %s)", name, host, port,
             type(template).__name__ if template else "none")
    build_server(app, host, port, log_level).run()
