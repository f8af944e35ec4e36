"""`lmlab align rejection-sampling`: best-of-N answers under a reward, then SFT on them."""
from __future__ import annotations

import argparse


def cmd_rejection_sampling(args: argparse.Namespace) -> None:
    from lmlab.stages.rejection import rejection_recipe

    report = rejection_recipe(args.config, args.set, args.resume)
    gold = report.get("gold_best_mean")
    print(f"best-of-{report['n']}: {report['chosen']} answers chosen, KL {report['kl_best_of_n']:.3f} nats"
          + ("" if gold is None else f", gold reward {report['gold_sample_mean']:.3f} -> {gold:.3f}"))


def align_group(sub) -> argparse._SubParsersAction:
    """The `align` command group's subparsers, created by the first module that needs it,
    so other alignment commands (PPO, DPO, ...) can join the same group."""
    parser = sub.choices.get("align")
    if parser is None:
        parser = sub.add_parser("align", help="alignment: rejection sampling (best-of-N + SFT)")
        parser.set_defaults(_align_sub=parser.add_subparsers(dest="align_command", required=True))
    return parser.get_default("_align_sub")


def add_commands(sub) -> None:
    p = align_group(sub).add_parser(
        "rejection-sampling", help="sample N answers per prompt, keep the best under a reward, fine-tune on them")
    p.add_argument("--config", required=True,
                   help="YAML: policy, prompts, out, n, reward (gold | RM dir | list of RM dirs), sft: {...}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true", help="continue the fine-tuning from its last checkpoint")
    p.set_defaults(func=cmd_rejection_sampling)
