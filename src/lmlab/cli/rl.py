"""`lmlab align ppo|grpo|rloo --config R`: online RL from an SFT policy."""
from __future__ import annotations

import argparse

from lmlab.stages.online_rl import METHODS


def cmd_align(args: argparse.Namespace) -> None:
    from lmlab.stages.online_rl import align_recipe

    result = align_recipe(args.method, args.config, args.set, args.resume)
    print(f"done: {result.run_dir}/model (rl_report.json and metrics.jsonl beside it)")


def add_commands(sub) -> None:
    align = sub.add_parser("align", help="online RL from an SFT policy: PPO, GRPO, RLOO").add_subparsers(
        dest="align_command", required=True)
    helps = {"ppo": "PPO: critic, KL to the reference, GAE, advantage whitening, EMA reference",
             "grpo": "GRPO: group-normalised advantages (Dr. GRPO, DAPO options), no critic",
             "rloo": "RLOO: leave-one-out baseline over each prompt's samples, no critic"}
    for method in METHODS:
        p = align.add_parser(method, help=helps[method])
        p.add_argument("--config", required=True, help="recipe YAML (policy, prompts, out, rollout, reward, "
                                                       f"{'ppo' if method == 'ppo' else 'grpo'}, train)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe key, e.g. --set rollout.group_size=8")
        p.add_argument("--resume", action="store_true")
        p.set_defaults(func=cmd_align, method=method)
