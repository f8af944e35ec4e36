"""Full fine-tuning vs LoRA vs DoRA at the same rank on SortWorld (OpenELM's finding: LoRA
and DoRA about equal), one command from a fresh checkout:

    python experiments/lora_vs_dora.py --out runs/lora-vs-dora --seeds 0 1 2 [--lrs 3e-3 1e-2 3e-2]

Per seed: export SortWorld, pretrain a small base on its corpus (`lmlab.pipeline` stages
tokenizer -> shards -> pretrain), then fine-tune a copy of that base with each method using
`src/lmlab/recipes/finetune-sort.yaml` (same data, rank, steps; `compare_methods`), and
report greedy answer exact match on held-out conversations and trainable parameters.
With `--lrs`, LoRA and DoRA are each run at every learning rate (full fine-tuning keeps the
recipe's `full_lr`), and the summary compares each method at its best rate (chosen by mean
exact match over the seeds, on the same held-out set: equally optimistic for both).

Writes into --out the unified form (experiment.json and results.md: the claim, one row per
(method and rate, seed), mean ± std, the verdict; `lmlab report OUT` shows them) and
details.md (every run, the mean per method and rate, each method's best rate).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from lmlab.config import load_yaml
from lmlab.io import write_text_atomic
from lmlab.hub import load_model
from lmlab.pipeline import load_recipe, run_pipeline
from lmlab.report.results import Claim, command_line, paired, write_results
from lmlab.tokenizer import Tokenizer
from lmlab.train.config import apply_overrides
from lmlab.train.finetune import FinetuneConfig, compare_methods
from lmlab.worlds.export import export_world

RECIPE = Path(__file__).resolve().parents[1] / "src" / "lmlab" / "recipes" / "finetune-sort.yaml"
# A ~0.9M-parameter base pretrained on SortWorld's corpus: it knows the symbols and the
# task's text format, but not the chat format or when to stop.
PRETRAIN = ["stages=[tokenizer, shards, pretrain]", "data.vocab_size=512", "data.seq_len=128",
            "data.val_fraction=0.05", "model={preset: nano, n_layers: 4, d_model: 128, n_heads: 4, "
            "n_kv_heads: 2, ffn_hidden: 344, max_seq_len: 128}",
            "train={steps: 300, batch_size: 16, lr: 3.0e-3, warmup_steps: 20, eval_every: 0, log_every: 50}"]
CLAIM = Claim(source="Mehta et al. 2024 (OpenELM)",
              statement="LoRA and DoRA at the same rank fine-tune about equally well.",
              paper_figure="similar average accuracy of LoRA and DoRA on commonsense-reasoning tasks for the "
                           "OpenELM models")
METRICS = ["exact_match", "val_loss", "trainable", "trainable_percent"]


def run_seed(seed: int, out: Path, steps: int, lrs: list[float]) -> list[dict]:
    world = out / f"seed{seed}" / "world"
    export_world("sort", world, seed=seed, n=2000)
    recipe, raw = load_recipe("quick", PRETRAIN + [f"data.source={world / 'corpus.jsonl'}", f"train.seed={seed}",
                                                 f"name=sort-base-{seed}"])
    base_dir = run_pipeline(recipe, out / f"seed{seed}" / "base", raw=raw).path("pretrain") / "model"
    data = apply_overrides(load_yaml(RECIPE), [f"data.train={world / 'sft.jsonl'}", f"train.steps={steps}",
                                               f"train.seed={seed}"])
    cfg = FinetuneConfig.from_dict({**data, "base": str(base_dir),
                                    "out": str(out / f"seed{seed}" / "sft")})
    base, tok = load_model(base_dir), Tokenizer.load(base_dir)
    if not lrs:
        return [{"seed": seed, **r} for r in compare_methods(base, tok, cfg, cfg.out)]
    rows = compare_methods(base, tok, cfg, Path(cfg.out) / "full", methods=("full",))
    for lr in lrs:
        swept = replace(cfg, train=replace(cfg.train, lr=lr))
        rows += compare_methods(base, tok, swept, Path(cfg.out) / f"lr{lr:g}", methods=("lora", "dora"))
    return [{"seed": seed, **r} for r in rows]


def _by_rate(rows: list[dict]) -> dict[tuple[str, float], list[float]]:
    means: dict[tuple[str, float], list[float]] = {}
    for r in rows:
        means.setdefault((r["method"], r["lr"]), []).append(r["exact_match"])
    return means


def best_rates(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """Each method's learning rate with the best mean exact match over seeds, and that mean
    (the first rate wins a tie)."""
    best: dict[str, tuple[float, float]] = {}
    for (method, lr), vals in _by_rate(rows).items():
        mean = statistics.fmean(vals)
        if method not in best or mean > best[method][1]:
            best[method] = (lr, mean)
    return best


def best_rate_summary(rows: list[dict]) -> list[str]:
    """Per method and learning rate, the mean over seeds; then each method at its best rate."""
    table = ["| method | lr | seeds | mean exact match |", "|---|---|---|---|"]
    for (method, lr), vals in _by_rate(rows).items():
        table.append(f"| {method} | {lr:g} | {len(vals)} | {statistics.fmean(vals):.3f} |")
    best = best_rates(rows)
    table += ["", "| method | best lr | mean exact match at it |", "|---|---|---|"]
    table += [f"| {m} | {lr:g} | {mean:.3f} |" for m, (lr, mean) in best.items()]
    return table


def arm(row: dict) -> str:
    return f"{row['method']} lr={row['lr']:g}"


def verdict(rows: list[dict]) -> str:
    """LoRA against DoRA, each at its best rate, seed by seed: 'about equal' when the mean
    difference is within two standard errors of the per-seed differences."""
    best = best_rates(rows)
    if "lora" not in best or "dora" not in best:
        return "not measured: the run has no LoRA or no DoRA result"
    lora = f"lora lr={best['lora'][0]:g}"
    dora = f"dora lr={best['dora'][0]:g}"
    p = paired([{**r, "arm": arm(r)} for r in rows], "exact_match", lora, dora)
    n, d = p["n"], p["mean_diff"]
    if p["stderr"] is None:
        label = "not resolved (one seed)"
    elif abs(d) <= 2 * p["stderr"]:
        label = "reproduced (about equal within two standard errors)"
    else:
        label = f"not reproduced ({'DoRA' if d > 0 else 'LoRA'} better beyond two standard errors)"
    spread = "" if p["stderr"] is None else f" ± {p['stderr']:.3f} (s.e.)"
    return (f"{label}: at their best rates ({lora}, {dora}) exact match LoRA {p['mean_a']:.3f} vs DoRA "
            f"{p['mean_b']:.3f}, DoRA − LoRA {d:+.3f}{spread}; DoRA ahead in {p['b_above']} of {n} "
            f"seed{'s' * (n != 1)}, LoRA in {p['b_below']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/lora-vs-dora")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=30, help="fine-tuning steps per method")
    parser.add_argument("--lrs", type=float, nargs="*", default=[],
                        help="sweep LoRA's and DoRA's learning rate over these values")
    args = parser.parse_args(argv)
    out = Path(args.out)
    rows = [r for seed in args.seeds for r in run_seed(seed, out, args.steps, args.lrs)]
    table = ["| seed | method | lr | trainable | trainable % | val loss | exact match |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {r['seed']} | {r['method']} | {r['lr']:g} | {r['trainable']:,} | {r['trainable_percent']:.2f} | "
              f"{r['val_loss']:.3f} | {r['exact_match']:.3f} |" for r in rows]
    table += ["", *best_rate_summary(rows)]
    write_text_atomic(out / "details.md", "\n".join(table) + "\n")
    ours = verdict(rows)
    write_results(out, name="lora-vs-dora", title="Full fine-tuning vs LoRA vs DoRA at the same rank on SortWorld",
                  claim=CLAIM, command=command_line(__file__, argv), metrics=METRICS,
                  rows=[{"arm": arm(r), **r} for r in rows], verdict=ours,
                  notes="Greedy answer exact match on held-out conversations (higher is better). Each method's "
                        "best rate is chosen by mean exact match on the same held-out set, equally optimistic "
                        "for both; details.md has the mean per method and rate.")
    print("\n".join(table))
    print(ours)
    return 0


if __name__ == "__main__":
    sys.exit(main())
