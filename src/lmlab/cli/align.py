"""`lmlab reward ...`: reward models, WARM weight averaging and scoring."""
from __future__ import annotations

import argparse


def cmd_reward_train(args: argparse.Namespace) -> None:
    from lmlab.rewards.train import reward_train_recipe

    result = reward_train_recipe(args.config, args.set, args.resume)
    print(f"done: {result.run_dir}/model (reward_report.json beside it)")


def cmd_reward_score(args: argparse.Namespace) -> None:
    from lmlab.rewards.train import score_file

    n = score_file(args.model, args.input, args.output, batch_size=args.batch_size, device=args.device,
                   template=args.template)
    print(f"scored {n} records -> {args.output}")


def cmd_reward_warm(args: argparse.Namespace) -> None:
    from lmlab.merge import warm_average

    print(f"wrote {warm_average(args.members, args.out, weights=args.weights)}")


def add_commands(sub) -> None:
    reward = sub.add_parser("reward", help="reward models: train, score, WARM weight averaging").add_subparsers(
        dest="reward_command", required=True)
    p = reward.add_parser("train", help="train a Bradley-Terry reward model on preference JSONL")
    p.add_argument("--config", required=True, help="recipe YAML (base, out, method, data, adapter, train)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_reward_train)
    p = reward.add_parser("score", help="score JSONL records (prompt + completion, or pairs) with a reward model")
    p.add_argument("model", help="a reward checkpoint (or a Hugging Face sequence-classification directory)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--template", help="override the chat template recorded with the model")
    p.set_defaults(func=cmd_reward_score)
    p = reward.add_parser("warm", help="WARM: average the weights of reward models fine-tuned from one init")
    p.add_argument("--members", nargs="+", required=True, metavar="DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--weights", nargs="+", type=float, help="one weight per member (normalised); default uniform")
    p.set_defaults(func=cmd_reward_warm)
