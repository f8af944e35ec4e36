"""Xu et al. (2024) Table 3 on SortWorld: vanilla PPO, then + advantage normalisation, +
large batch, + EMA reference, one switch at a time, from one SFT policy.

    lmlab run --run-dir runs/base                     # tokenizer .. sft, eval (the default recipe)
    python experiments/ppo_ablation.py --run runs/base --out runs/ppo-ablation --seeds 0 1 2

Each configuration trains `--iterations` rollouts with the dense gold reward and reports, on
the world's held-out prompts (greedy), the gold reward, the sparse (verifiable) reward and
exact match, plus KL to the SFT policy and wall time; one row per (configuration, seed), and
the mean over seeds, in `<out>/ablation.md` and `ablation.json`.
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from lmlab.io import write_json_atomic, write_text_atomic
from lmlab.align.online import OnlineRLConfig, RewardSpec, align_online
from lmlab.train.objectives.ppo import PPOConfig
from lmlab.train.rollout import RolloutConfig

# Cumulative, as in the paper's table: each row adds one practice to the one above.
STEPS = [
    ("vanilla PPO", dict(whiten_advantages=False, large_batch=False, ema=False)),
    ("+ advantage normalisation", dict(whiten_advantages=True, large_batch=False, ema=False)),
    ("+ large batch", dict(whiten_advantages=True, large_batch=True, ema=False)),
    ("+ EMA reference", dict(whiten_advantages=True, large_batch=True, ema=True)),
]
METRICS = ("gold_dense", "gold_sparse", "exact_match", "kl_to_sft")


def config(run: Path, out: Path, seed: int, switches: dict, iterations: int, prompts: int, lr: float) -> OnlineRLConfig:
    base = OnlineRLConfig(
        method="ppo", policy=str(run / "sft" / "model"), prompts=str(run / "world" / "sft.jsonl"),
        eval_prompts=str(run / "world" / "eval.jsonl"), eval_n=64, out=str(out), iterations=iterations,
        rollout=RolloutConfig(prompts=prompts, group_size=4, max_new_tokens=16, seed=seed),
        reward=RewardSpec(kind="gold", gold="dense"), small_batch_divisor=8)
    ppo = replace(PPOConfig(), whiten_advantages=switches["whiten_advantages"], ema=switches["ema"])
    return replace(base, ppo=ppo, large_batch=switches["large_batch"],
                   train=replace(base.train, lr=lr, seed=seed, progress=False, precision="auto"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a run directory holding sft/model and world/")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=32, help="rollout prompts of the large batch (small: / 8)")
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()
    run, out = Path(args.run), Path(args.out)
    rows = []
    for name, switches in STEPS:
        for seed in args.seeds:
            where = out / f"{name.strip('+ ').replace(' ', '-')}-seed{seed}"
            cfg = config(run, where, seed, switches, args.iterations, args.prompts, args.lr)
            res = align_online(cfg, where, resume="auto", log=lambda s: None)
            r = res.report
            rows.append({"config": name, "seed": seed, **{k: r["after"].get(k) for k in METRICS},
                         "before_gold_dense": r["before"].get("gold_dense"), "seconds": r["seconds"]})
            print(json.dumps(rows[-1]))
    write_json_atomic(out / "ablation.json", rows)
    lines = ["| configuration | gold (dense) | verifiable (sparse) | exact match | KL to SFT | s | seeds |",
             "|---|---|---|---|---|---|---|"]
    for name, _ in STEPS:
        mine = [r for r in rows if r["config"] == name]

        def cell(key):
            vals = [r[key] for r in mine if r[key] is not None]
            if not vals:
                return "-"
            sd = f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
            return f"{statistics.mean(vals):.3f}{sd}"

        lines.append(f"| {name} | {cell('gold_dense')} | {cell('gold_sparse')} | {cell('exact_match')} | "
                     f"{cell('kl_to_sft')} | {statistics.mean(r['seconds'] for r in mine):.0f} | {len(mine)} |")
    sft = rows[0]["before_gold_dense"] if rows else None
    lines.append(f"\nSFT policy before PPO: gold (dense) {sft:.3f}" if sft is not None else "")
    write_text_atomic(out / "ablation.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
