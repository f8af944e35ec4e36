"""Xu et al. (2024) Table 3 on SortWorld: vanilla PPO, then + advantage normalisation, +
large batch, + EMA reference, one switch at a time, from one SFT policy.

    lmlab run --config experiments/ppo-base.yaml --run-dir runs/base   # see docs/experiments.md
    python experiments/ppo_ablation.py --run runs/base --out runs/ppo-ablation --seeds 0 1 2

Each configuration trains `--iterations` rollouts with the dense gold reward and reports, on
the world's held-out prompts (greedy), the gold reward, the sparse (verifiable) reward and
exact match, plus KL to the SFT policy and wall time; one row per (configuration, seed), and
the mean over seeds, in `<out>/ablation.md` and `ablation.json`, and in the unified form,
`<out>/experiment.json` and `results.md` (the claim, every seed, mean ± std, the verdict;
`lmlab report OUT` shows them).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from lmlab.io import write_json_atomic, write_text_atomic
from lmlab.align.online import OnlineRLConfig, RewardSpec, align_online
from lmlab.report.results import Claim, command_line, paired, write_results
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
CLAIM = Claim(source="Xu et al. 2024 (Is DPO superior to PPO?), Table 3",
              statement="each of PPO's practices (advantage normalisation, a large batch, an exponential moving "
                        "average of the reference model) adds to vanilla PPO's result.",
              paper_figure="Table 3: vanilla PPO's score rises as advantage normalisation, the large batch and the "
                           "EMA reference are added in turn")
SFT = "SFT policy"


def config(run: Path, out: Path, seed: int, switches: dict, iterations: int, prompts: int, lr: float) -> OnlineRLConfig:
    base = OnlineRLConfig(
        method="ppo", policy=str(run / "sft" / "model"), prompts=str(run / "world" / "sft.jsonl"),
        eval_prompts=str(run / "world" / "eval.jsonl"), eval_n=64, out=str(out), iterations=iterations,
        rollout=RolloutConfig(prompts=prompts, group_size=4, max_new_tokens=16, seed=seed),
        reward=RewardSpec(kind="gold", gold="dense"), small_batch_divisor=8)
    ppo = replace(PPOConfig(), whiten_advantages=switches["whiten_advantages"], ema=switches["ema"])
    return replace(base, ppo=ppo, large_batch=switches["large_batch"],
                   train=replace(base.train, lr=lr, seed=seed, progress=False, precision="auto"))


def unified_rows(rows: list[dict]) -> list[dict]:
    """One row per (configuration, seed), and the SFT policy each seed started from (read
    from its vanilla run's evaluation before training)."""
    metrics = (*METRICS, "seconds")
    out = [{"arm": SFT, "seed": r["seed"], "gold_dense": r["before_gold_dense"]}
           for r in rows if r["config"] == STEPS[0][0]]
    return out + [{"arm": r["config"], "seed": r["seed"], **{k: r[k] for k in metrics}} for r in rows]


def verdict(rows: list[dict]) -> str:
    """Each practice is compared with the row above it, seed by seed, on the dense gold reward:
    it adds when its mean gain is positive and larger than two standard errors of the per-seed
    gains (with one seed, when it is positive at all)."""
    unified = unified_rows(rows)
    steps, adds, flat = [], [], []
    for (before, _), (after, _) in zip(STEPS, STEPS[1:]):
        p = paired(unified, "gold_dense", before, after)
        if not p["n"]:
            continue
        d, se = p["mean_diff"], p["stderr"]
        (adds if d > 0 and (se is None or d > 2 * se) else flat).append(after)
        spread = "" if se is None else f" ± {se:.3f}"
        steps.append(f"{after} {p['mean_b']:.3f} ({d:+.3f}{spread}, up in {p['b_above']} of {p['n']})")
    vanilla = [r["gold_dense"] for r in unified if r["arm"] == STEPS[0][0] and r["gold_dense"] is not None]
    if not steps or not vanilla:
        return "not measured: vanilla PPO and at least one practice must each have a gold reward"
    n = len(vanilla)
    start = f"gold (dense) {STEPS[0][0]} {statistics.fmean(vanilla):.3f} → " + " → ".join(steps)
    sft = [r["gold_dense"] for r in unified if r["arm"] == SFT and r["gold_dense"] is not None]
    tail = f"; SFT policy {statistics.fmean(sft):.3f}" if sft else ""
    tail += f"; {n} seed{'s' * (n != 1)}, ± is the standard error of the per-seed gain"
    if not flat:
        label = "reproduced: every practice adds"
    elif not adds:
        label = "not reproduced: no practice adds measurably"
    else:
        label = f"partly reproduced: {', '.join(flat)} add{'s' * (len(flat) == 1)} nothing measurable"
    return f"{label}. {start}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a run directory holding sft/model and world/")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=32, help="rollout prompts of the large batch (small: / 8)")
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args(argv)
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
    ours = verdict(rows)
    write_results(out, name="ppo-ablation", title="PPO's practices, one at a time, on SortWorld (Xu et al. Table 3)",
                  claim=CLAIM, command=command_line(__file__, argv), metrics=[*METRICS, "seconds"],
                  rows=unified_rows(rows), verdict=ours,
                  notes="Each configuration adds one practice to the one above it, from one SFT policy; greedy "
                        "evaluation on the world's held-out prompts. The large batch also sees 8x more samples "
                        "for the same number of updates. Wall time is in seconds per run.")
    print("\n".join(lines))
    print(ours)
    return 0


if __name__ == "__main__":
    sys.exit(main())
