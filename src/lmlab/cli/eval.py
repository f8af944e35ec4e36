"""`lmlab eval ...`: perplexity, multiple choice, a world's gold reward, win rate, and
lm-eval tasks through the lmlab adapter. Each prints a table; --out writes the JSON."""
from __future__ import annotations

import argparse

from lmlab.errors import LmlabError


def _open(args):
    from lmlab.hub import load_model
    from lmlab.precision import resolve
    from lmlab.tokenizer import Tokenizer

    model = load_model(args.model, device=args.device).eval()
    tok = Tokenizer.load(args.tokenizer or args.model)
    return model, tok, resolve(args.precision, args.device)


def _finish(result: dict, rows, args, header=("metric", "value", "stderr")) -> None:
    from lmlab.eval.report import save, table

    print(table(rows, header))
    save(result, args.out)
    if args.out:
        print(f"results: {args.out}")


def cmd_perplexity(args: argparse.Namespace) -> None:
    from itertools import islice

    from lmlab.data.sources import read_texts
    from lmlab.eval.perplexity import perplexity

    model, tok, precision = _open(args)
    texts = read_texts(args.corpus, text_field=args.text_field)
    if args.limit:
        texts = islice(texts, args.limit)
    result = perplexity(model, tok, texts, stride=args.stride, max_len=args.window, batch_size=args.batch_size,
                        precision=precision)
    keys = ("documents", "tokens", "window", "stride", "nll_per_token", "token_perplexity", "word_perplexity",
            "byte_perplexity", "bits_per_byte")
    _finish(result, [(k, result[k]) for k in keys], args, ("metric", "value"))


def cmd_mc(args: argparse.Namespace) -> None:
    from lmlab.eval.multiple_choice import multiple_choice, read_task
    from lmlab.eval.report import metric_rows

    model, tok, precision = _open(args)
    questions = read_task(args.task)[: args.limit or None]
    result = multiple_choice(model, tok, questions, delimiter=args.delimiter, add_special_tokens=not args.no_bos,
                             batch_size=args.batch_size, precision=precision)
    rows = [("questions", result["questions"], float("nan")), ("chance", result["chance"], float("nan"))]
    _finish(result, rows + metric_rows(result, ("acc", "acc_norm")), args)


def cmd_gold(args: argparse.Namespace) -> None:
    from lmlab.eval.gold import read_eval_rows, world_eval

    model, tok, precision = _open(args)
    template = None
    if args.prompt_format == "chat":
        from lmlab.serve.server import chat_template_for

        template = chat_template_for(args.tokenizer or args.model, tok)
    result = world_eval(model, tok, read_eval_rows(args.world), prompt_format=args.prompt_format, template=template,
                        max_new_tokens=args.max_new_tokens, precision=precision, limit=args.limit)
    for ex in result["examples"][:3]:
        print(f"--- {ex['prompt']!r} -> {ex['answer']!r}")
    keys = ("generated", "gold_reward_dense", "gold_reward_sparse", "exact_match")
    _finish(result, [(k, result[k]) for k in keys if k in result], args, ("metric", "value"))


def _reward(spec: str, device: str):
    from pathlib import Path

    from lmlab.rewards.base import GoldReward, ModelReward

    if spec in ("gold", "gold-dense"):
        return GoldReward("sort", "dense")
    if spec == "gold-sparse":
        return GoldReward("sort", "sparse")
    if not Path(spec).is_dir():
        raise LmlabError(f"--reward {spec!r} is neither gold, gold-sparse nor a reward model directory")
    return ModelReward.from_dir(spec, device=device)


def cmd_win_rate(args: argparse.Namespace) -> None:
    from lmlab.eval.gold import read_eval_rows
    from lmlab.eval.win_rate import Policy, win_rate
    from lmlab.precision import resolve

    prompts = [r["prompt"] for r in read_eval_rows(args.prompts)][: args.limit or None]
    a = Policy.from_dir(args.model_a, args.device, args.prompt_format)
    b = Policy.from_dir(args.model_b, args.device, args.prompt_format)
    result = win_rate(a, b, prompts, _reward(args.reward, args.device), max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, seed=args.seed, precision=resolve(args.precision, args.device),
                      tie_margin=args.tie_margin)
    rows = [("prompts", result["prompts"], float("nan")), ("wins", result["wins"], float("nan")),
            ("ties", result["ties"], float("nan")), ("losses", result["losses"], float("nan")),
            ("win_rate", result["win_rate"], result["win_rate_stderr"]),
            ("mean_reward_a", result["mean_reward_a"], float("nan")),
            ("mean_reward_b", result["mean_reward_b"], float("nan"))]
    _finish(result, rows, args)


def cmd_lm_eval(args: argparse.Namespace) -> None:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LmlabError("lmlab eval lm-eval needs lm-evaluation-harness: pip install 'lm-eval>=0.4'") from None
    from lmlab.eval.lm_eval_adapter import register

    register()
    model_args = f"pretrained={args.model},device={args.device},precision={args.precision}"
    if args.tokenizer:
        model_args += f",tokenizer={args.tokenizer}"
    if args.no_bos:
        model_args += ",add_bos_token=False"
    manager = TaskManager(include_path=args.include_path, include_defaults=not args.include_path)
    out = lm_eval.simple_evaluate(model="lmlab", model_args=model_args, tasks=args.tasks.split(","),
                                  task_manager=manager, num_fewshot=args.num_fewshot, limit=args.limit,
                                  batch_size=args.batch_size)
    rows = []
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if name.endswith("_stderr") or not isinstance(value, (int, float)) or name == "alias":
                continue
            stderr = metrics.get(f"{name}_stderr,{_filter}", float("nan"))
            rows.append((task, name, float(value), stderr if isinstance(stderr, float) else float("nan")))
    result = {"results": out["results"], "config": {"model_args": model_args, "tasks": args.tasks}}
    _finish(result, rows, args, ("task", "metric", "value", "stderr"))


def _common(p, model: bool = True) -> None:
    if model:
        p.add_argument("model", help="an lmlab or Hugging Face model directory")
        p.add_argument("--tokenizer", help="default: the tokenizer in the model directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", help="auto, float32, bf16 or fp16 (lmlab.precision)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, help="evaluate only the first N items")
    p.add_argument("--out", help="write the results as JSON here")


def add_commands(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a model: perplexity, multiple choice, gold reward, win rate, "
                                     "lm-eval tasks").add_subparsers(dest="eval_command", required=True)
    p = ev.add_parser("perplexity", help="perplexity of a corpus in rolling windows (every token scored once)")
    _common(p)
    p.add_argument("corpus", help="text file(s), JSONL, Parquet or a datasets directory (as lmlab data reads)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--window", type=int, help="tokens the model reads per window (default: its context)")
    p.add_argument("--stride", type=int, help="tokens predicted per window after the first (default: the window; "
                                              "smaller gives every prediction more context)")
    p.set_defaults(func=cmd_perplexity)
    p = ev.add_parser("mc", help="multiple choice by log-likelihood from a JSONL task (acc, acc_norm)")
    _common(p)
    p.add_argument("task", help='JSONL: {"query" (or "context"), "choices": [...], "gold": index}')
    p.add_argument("--delimiter", default=" ", help="text between the query and each choice (default: a space)")
    p.add_argument("--no-bos", action="store_true", help="score bare text, without the tokenizer's BOS")
    p.set_defaults(func=cmd_mc)
    p = ev.add_parser("gold", help="a world's held-out prompts answered greedily: gold reward, exact match")
    _common(p)
    p.add_argument("world", help="a world directory (lmlab world export) or its eval.jsonl")
    p.add_argument("--prompt-format", choices=("chat", "base"), default="chat",
                   help="chat: the prompt as a user turn in the model's chat template; base: base_prompt as text")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=cmd_gold)
    p = ev.add_parser("win-rate", help="pairwise win rate of two policies judged by a reward (ties count half)")
    _common(p, model=False)
    p.add_argument("model_a")
    p.add_argument("model_b")
    p.add_argument("prompts", help='a world directory, its eval.jsonl, or any JSONL with a "prompt" per line')
    p.add_argument("--reward", required=True, help="gold (SortWorld dense), gold-sparse, or a reward model directory")
    p.add_argument("--prompt-format", choices=("chat", "base"), default="chat")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy answers")
    p.add_argument("--seed", type=int)
    p.add_argument("--tie-margin", type=float, default=0.0, help="scores this close count as a tie")
    p.set_defaults(func=cmd_win_rate)
    p = ev.add_parser("lm-eval", help="run lm-evaluation-harness tasks on the model through the lmlab adapter")
    _common(p)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", help="a directory of task YAMLs (then only those tasks are indexed)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--no-bos", action="store_true", help="score bare text (add_bos_token=False)")
    p.set_defaults(func=cmd_lm_eval)
