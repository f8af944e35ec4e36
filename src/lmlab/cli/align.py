"""`lmlab reward ...` (reward models, WARM, scoring) and `lmlab align ...` (DPO, iterative DPO,
rejection sampling, online RL): everything that turns preferences or rewards into a model."""
from __future__ import annotations

import argparse

from lmlab.align.online import METHODS


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


def cmd_dpo(args: argparse.Namespace) -> None:
    from lmlab.align.dpo import dpo_recipe

    result = dpo_recipe(args.config, args.set, args.resume)
    print(f"done: {result.model_dir} (dpo_report.json and metrics.jsonl beside it)")


def cmd_iterative_dpo(args: argparse.Namespace) -> None:
    from lmlab.align.iterative import iterative_dpo_recipe

    result = iterative_dpo_recipe(args.config, args.set, args.resume)
    rewards = ", ".join(f"{r['mean_reward']:.3f}" for r in result.rounds)
    print(f"done: {result.model_dir} (mean sampled reward per round: {rewards})")


def cmd_rejection_sampling(args: argparse.Namespace) -> None:
    from lmlab.stages.rejection import rejection_recipe

    report = rejection_recipe(args.config, args.set, args.resume)
    gold = report.get("gold_best_mean")
    print(f"best-of-{report['n']}: {report['chosen']} answers chosen, KL {report['kl_best_of_n']:.3f} nats"
          + ("" if gold is None else f", gold reward {report['gold_sample_mean']:.3f} -> {gold:.3f}"))


def cmd_online_rl(args: argparse.Namespace) -> None:
    from lmlab.align.online import align_recipe

    result = align_recipe(args.method, args.config, args.set, args.resume)
    print(f"done: {result.run_dir}/model (rl_report.json and metrics.jsonl beside it)")


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="recipe YAML (base, out, method, loss, beta, reference, data, "
                   "adapter, train; iterative for iterative-dpo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set beta=0.2 or --set train.lr=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in `out` from its last checkpoint")


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

    align = sub.add_parser("align", help="alignment: DPO and variants, iterative DPO, rejection sampling, "
                           "PPO/GRPO/RLOO").add_subparsers(dest="align_command", required=True)
    p = align.add_parser("dpo", help="offline DPO (sigmoid, ipo, ipo_sum, cdpo, robust, hinge; TR-DPO; "
                         "sft_first) on preference JSONL")
    _recipe_args(p)
    p.set_defaults(func=cmd_dpo)
    p = align.add_parser("iterative-dpo", help="rounds of sample -> label best vs worst with a reward -> DPO")
    _recipe_args(p)
    p.set_defaults(func=cmd_iterative_dpo)
    p = align.add_parser("rejection-sampling",
                         help="sample N answers per prompt, keep the best under a reward, fine-tune on them")
    p.add_argument("--config", required=True,
                   help="YAML: policy, prompts, out, n, reward (gold | RM dir | list of RM dirs), sft: {...}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true", help="continue the fine-tuning from its last checkpoint")
    p.set_defaults(func=cmd_rejection_sampling)
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
        p.set_defaults(func=cmd_online_rl, method=method)
