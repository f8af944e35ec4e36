"""The `lmlab` command: a thin layer that parses arguments and calls library functions."""
from __future__ import annotations

import argparse
import json
import sys

from lmlab.errors import LmlabError


def cmd_inspect(args: argparse.Namespace) -> None:
    from lmlab.config import PRESETS, get_preset, resolve_model_config, load_yaml
    from lmlab.summary import describe, format_count

    names = sorted(PRESETS) if args.preset == "all" else [args.preset]
    for name in names:
        cfg = resolve_model_config(load_yaml(name).get("model", {})) if name.endswith((".yaml", ".yml")) else get_preset(name)
        info = describe(cfg)
        if args.json:
            print(json.dumps(info))
            continue
        active = "" if info["active_parameters"] == info["parameters"] else f"  active {format_count(info['active_parameters'])}"
        print(f"{info['name']:<18} total {format_count(info['parameters'])} ({info['parameters']:,}){active}"
              f"  [{info['reference']}]")


def cmd_finetune(args: argparse.Namespace) -> None:
    from lmlab.train.finetune import finetune_recipe

    compare = tuple(m.strip() for m in args.compare.split(",")) if args.compare else ()
    result = finetune_recipe(args.config, args.method, args.set, args.resume, compare)
    if not compare:
        print(f"done: {result.train.run_dir} (model/, adapter/ for LoRA/DoRA, finetune_report.json)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmlab", description="A from-scratch lab for language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="print parameter counts of a preset (or 'all', or a recipe YAML)")
    p.add_argument("preset")
    p.add_argument("--json", action="store_true", help="one JSON object per model")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("finetune", help="supervised fine-tuning on chat JSONL: full, LoRA or DoRA")
    p.add_argument("--config", required=True, help="recipe YAML (base, out, method, data, adapter, train)")
    p.add_argument("--method", choices=("full", "lora", "dora"), help="overrides the recipe's method")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set adapter.r=16 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in `out` from its last checkpoint")
    p.add_argument("--compare", metavar="METHODS", help="e.g. full,lora,dora: one run per method into "
                   "out/<method>, then a table in out/comparison.md")
    p.set_defaults(func=cmd_finetune)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except LmlabError as e:
        print(f"lmlab: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
