"""`lmlab run`, `lmlab pretrain`, `lmlab finetune`: recipes through the pipeline's stages."""
from __future__ import annotations

import argparse


def _stage_list(text: str | None) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip()) if text else ()


def cmd_run(args: argparse.Namespace) -> None:
    from lmlab.pipeline import load_recipe, run_pipeline, unique_run_dir, with_precision

    recipe, raw = load_recipe(args.config, args.set)
    if args.precision:
        recipe = with_precision(recipe, args.precision)  # hashed into every stage's marker
        print(f"precision: {args.precision} in every stage (--precision)")
    continuing = args.resume or args.only or args.start
    run_dir = args.run_dir or (f"runs/{recipe.name}" if continuing else unique_run_dir("runs", recipe.name))
    print(f"run directory: {run_dir}")
    run_pipeline(recipe, run_dir, resume=args.resume, raw=raw, only=_stage_list(args.only),
                 start=args.start, skip=_stage_list(args.skip))


def cmd_pretrain(args: argparse.Namespace) -> None:
    from lmlab.pipeline import load_recipe, run_pipeline

    recipe, raw = load_recipe(args.config, args.set)
    run_pipeline(recipe, args.run_dir or f"runs/{recipe.name}", resume=args.resume, raw=raw,
                 stages=("tokenizer", "shards", "pretrain"))


def cmd_finetune(args: argparse.Namespace) -> None:
    from lmlab.train.finetune import finetune_recipe

    compare = _stage_list(args.compare)
    result = finetune_recipe(args.config, args.method, args.set, args.resume, compare)
    if not compare:
        print(f"done: {result.train.run_dir} (model/, adapter/ for LoRA/DoRA, finetune_report.json)")


def _recipe_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--config", required=required,
                   help="recipe YAML, or a packaged recipe's name (default, quick, llama3-chain)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--run-dir", help="where each stage's outputs go (default runs/<name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run: skip completed stages, resume a half-done one from its checkpoint")


def add_commands(sub) -> None:
    p = sub.add_parser("run", help="the whole lifecycle on the embedded corpus and world (about 10 minutes on CPU)")
    _recipe_args(p, required=False)
    p.add_argument("--precision", metavar="P", help="auto | float32 | bf16 | fp16 for every stage (default: the "
                   "recipe's, auto: what the hardware runs natively)")
    p.add_argument("--only", metavar="STAGES", help="run only these stages (comma-separated), e.g. sft,eval")
    p.add_argument("--from", dest="start", metavar="STAGE", help="rerun this stage and all after it")
    p.add_argument("--skip", metavar="STAGES", help="leave these stages out (comma-separated)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("pretrain", help="train a tokenizer, shard the data and pretrain a model from a recipe")
    _recipe_args(p, required=True)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="supervised fine-tuning on chat JSONL: full, LoRA or DoRA (the sft stage)")
    p.add_argument("--config", required=True, help="recipe YAML (base, out, method, data, adapter, train)")
    p.add_argument("--method", choices=("full", "lora", "dora"), help="overrides the recipe's method")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set adapter.r=16 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in `out` from its last checkpoint")
    p.add_argument("--compare", metavar="METHODS", help="e.g. full,lora,dora: one run per method into "
                   "out/<method>, then a table in out/comparison.md")
    p.set_defaults(func=cmd_finetune)
