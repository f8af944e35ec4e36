"""`lmlab serve`: an OpenAI-compatible HTTP server with continuous batching."""
from __future__ import annotations

import argparse

OPTIONS = ("api_key", "max_batch", "max_queue", "max_tokens", "max_n", "max_prompt_tokens",
           "max_body_bytes", "max_prefill_tokens")


def cmd_serve(args: argparse.Namespace) -> None:
    from lmlab.serve.server import serve

    options = {k: getattr(args, k) for k in OPTIONS if getattr(args, k) is not None}
    serve(args.model, args.host, args.port, tokenizer=args.tokenizer, device=args.device,
          model_name=args.model_name, log_level=args.log_level, expert=args.expert,
          anti_expert=args.anti_expert, alpha=args.alpha, **options)


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (continuous batching)")
    p.add_argument("model", help="an lmlab or Hugging Face model directory")
    p.add_argument("--tokenizer", help="default: the tokenizer in the model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every request")
    p.add_argument("--model-name", help="the name clients use (default: the directory's name)")
    p.add_argument("--max-batch", type=int, help="sequences decoded together (default 32)")
    p.add_argument("--max-queue", type=int, help="waiting requests before 429 (default 256)")
    p.add_argument("--max-tokens", type=int, help="largest max_tokens a request may ask (default 1024)")
    p.add_argument("--max-n", type=int, help="largest n (default 8)")
    p.add_argument("--max-prompt-tokens", type=int, help="longest prompt (default: the model's context)")
    p.add_argument("--max-body-bytes", type=int, help="largest request body (default 1 MiB)")
    p.add_argument("--max-prefill-tokens", type=int, help="prompt tokens prefilled per step (default 4096)")
    p.add_argument("--expert", help="serve a proxy-tuned trio: MODEL is the base, this the tuned small model")
    p.add_argument("--anti-expert", help="the expert's untuned counterpart")
    p.add_argument("--alpha", type=float, default=1.0, help="proxy-tuning strength")
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)
