"""`lmlab align dpo` and `lmlab align iterative-dpo`: preference optimisation of a policy."""
from __future__ import annotations

import argparse


def cmd_dpo(args: argparse.Namespace) -> None:
    from lmlab.align.dpo import dpo_recipe

    result = dpo_recipe(args.config, args.set, args.resume)
    print(f"done: {result.model_dir} (dpo_report.json and metrics.jsonl beside it)")


def cmd_iterative_dpo(args: argparse.Namespace) -> None:
    from lmlab.align.iterative import iterative_dpo_recipe

    result = iterative_dpo_recipe(args.config, args.set, args.resume)
    rewards = ", ".join(f"{r['mean_reward']:.3f}" for r in result.rounds)
    print(f"done: {result.model_dir} (mean sampled reward per round: {rewards})")


def align_group(sub):
    """The `align` subcommand group, shared with other modules that add commands to it."""
    if "align" in sub.choices:
        parser = sub.choices["align"]
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.add_parser("align", help="preference optimisation: DPO and its variants, iterative DPO"
                          ).add_subparsers(dest="align_command", required=True)


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="recipe YAML (base, out, method, loss, beta, reference, data, "
                   "adapter, train; iterative for iterative-dpo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set beta=0.2 or --set train.lr=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in `out` from its last checkpoint")


def add_commands(sub) -> None:
    align = align_group(sub)
    p = align.add_parser("dpo", help="offline DPO (sigmoid, ipo, ipo_sum, cdpo, robust, hinge; TR-DPO; "
                         "sft_first) on preference JSONL")
    _recipe_args(p)
    p.set_defaults(func=cmd_dpo)
    p = align.add_parser("iterative-dpo", help="rounds of sample -> label best vs worst with a reward -> DPO")
    _recipe_args(p)
    p.set_defaults(func=cmd_iterative_dpo)
