"""`lmlab generate`: sampling, proxy-tuning and speculative decoding from the command line."""
from __future__ import annotations

import argparse

from lmlab.errors import LmlabError


def cmd_generate(args: argparse.Namespace) -> None:
    from lmlab.decode.generate import generate, stream
    from lmlab.decode.members import open_member, open_tokenizer, require_weights

    tok = open_tokenizer(args.model, args.tokenizer)
    # BOS/EOS exactly as the checkpoint's own tokenizer adds them.
    prompts = [tok.encode(p, add_special_tokens=True) for p in args.prompt]

    def member(spec: str):
        return open_member(spec, tok, prompts, args.remote_model, args.remote_top_k)

    proxy = bool(args.proxy_expert or args.proxy_anti)
    if not proxy:
        require_weights(args.model, "plain and speculative decoding")
    model = member(args.model)
    if args.quantize:
        from lmlab.decode.quant import quantize_model

        quantize_model(model, args.quantize, group_size=args.group_size)
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                   eos_id=tok.eos_id, seed=args.seed)
    if args.draft:
        from lmlab.decode.speculative import speculative_generate

        draft = member(args.draft)
        for text, ids in zip(args.prompt, prompts):
            out = speculative_generate(model, draft, ids, args.max_new_tokens, k=args.speculate_k, **options)
            body = out.tokens[:-1] if out.finish_reason == "eos" else out.tokens
            print(f"{text}{tok.decode(body)}\n[{out.finish_reason}; {out.accepted}/{out.proposed} draft tokens "
                  f"accepted ({out.acceptance_rate:.0%}), {out.target_forwards} target forwards]")
        return
    options.update(repetition_penalty=args.repetition_penalty, stop=args.stop or None, decode=tok.decode)
    plain = dict(compile=True) if args.compile else {}
    if proxy:
        from lmlab.decode.proxy import proxy_generate

        if not (args.proxy_expert and args.proxy_anti):
            raise LmlabError("proxy-tuning needs both --proxy-expert and --proxy-anti (the expert's untuned base)")
        outs = proxy_generate(model, member(args.proxy_expert), member(args.proxy_anti), prompts,
                              args.max_new_tokens, alpha=args.alpha, truncate_vocab=args.truncate_vocab, **options)
    elif len(prompts) == 1:  # stream the text as it is generated
        results, shown = [], ""
        print(args.prompt[0], end="", flush=True)
        for _ in stream(model, prompts, args.max_new_tokens, results=results, **options, **plain):
            text = tok.decode([t for t in results[0].tokens if t != tok.eos_id])
            print(text[len(shown):], end="", flush=True)
            shown = text
        print()
        return
    else:
        outs = generate(model, prompts, args.max_new_tokens, **options, **plain)
    for prompt, g in zip(args.prompt, outs):
        print(f"{prompt}{g.text}\n[{g.finish_reason}, {len(g.tokens)} tokens]")


def add_commands(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a model directory (KV-cached, batched)")
    p.add_argument("model", help="a model directory: lmlab (any kind, step checkpoints included) or Hugging "
                                 "Face; a URL for a remote proxy-tuning base")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    p.add_argument("--tokenizer", help="default: the tokenizer in the model directory")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--proxy-expert", help="proxy-tuning: a small tuned model (MODEL is the base); dir or URL")
    p.add_argument("--proxy-anti", help="proxy-tuning: the expert's untuned counterpart; dir or URL")
    p.add_argument("--alpha", type=float, default=1.0, help="proxy-tuning strength")
    p.add_argument("--truncate-vocab", action="store_true",
                   help="proxy-tuning: cut members to the smallest vocabulary (only if larger ones append tokens)")
    p.add_argument("--remote-model", default="default", help="model name sent to remote (URL) members")
    p.add_argument("--remote-top-k", type=int, default=20, help="log-probs asked of remote members")
    p.add_argument("--draft", help="speculative decoding: a small draft model with the same tokenizer")
    p.add_argument("--speculate-k", type=int, default=4, help="draft tokens proposed per target forward")
    p.add_argument("--quantize", choices=("int8", "int4"), help="weight-only quantisation at load time")
    p.add_argument("--group-size", type=int, default=32, help="int4: inputs per scale group")
    p.add_argument("--compile", action="store_true",
                   help="a static-shape decode step under torch.compile (pays off for small/quantised models)")
    p.set_defaults(func=cmd_generate)
