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


def run_seed(seed: int, out: Path, steps: int, lrs: list[float]) -> list[dict]:
    world = out / f"seed{seed}" / "world"
    export_world("sort", world, seed=seed, n=2000)
    recipe, raw = load_recipe(None, PRETRAIN + [f"data.source={world / 'corpus.jsonl'}", f"train.seed={seed}",
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


def best_rate_summary(rows: list[dict]) -> list[str]:
    """Per method and learning rate, the mean over seeds; then each method at its best rate."""
    means: dict[tuple[str, float], list[float]] = {}
    for r in rows:
        means.setdefault((r["method"], r["lr"]), []).append(r["exact_match"])
    table = ["| method | lr | seeds | mean exact match |", "|---|---|---|---|"]
    best: dict[str, tuple[float, float]] = {}
    for (method, lr), vals in means.items():
        mean = statistics.fmean(vals)
        table.append(f"| {method} | {lr:g} | {len(vals)} | {mean:.3f} |")
        if method not in best or mean > best[method][1]:
            best[method] = (lr, mean)
    table += ["", "| method | best lr | mean exact match at it |", "|---|---|---|"]
    table += [f"| {m} | {lr:g} | {mean:.3f} |" for m, (lr, mean) in best.items()]
    return table


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
    write_text_atomic(out / "results.md", "\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
