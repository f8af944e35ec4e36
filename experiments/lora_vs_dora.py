"""Full fine-tuning vs LoRA vs DoRA at the same rank on SortWorld (OpenELM's finding: LoRA
and DoRA about equal), one command from a fresh checkout:

    python experiments/lora_vs_dora.py --out runs/lora-vs-dora --seeds 0 1 2

Per seed: export SortWorld, pretrain a small base on its corpus (`lmlab.pipeline` stages
tokenizer -> shards -> pretrain), then fine-tune a copy of that base with each method using
`src/lmlab/recipes/finetune-sort.yaml` (same data, rank, steps; `compare_methods`), and
report greedy answer exact match on held-out conversations and trainable parameters.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmlab.config import load_yaml
from lmlab.io import write_text_atomic
from lmlab.pipeline import load_recipe, run_pipeline
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


def run_seed(seed: int, out: Path, steps: int) -> list[dict]:
    world = out / f"seed{seed}" / "world"
    export_world("sort", world, seed=seed, n=2000)
    recipe, raw = load_recipe(None, PRETRAIN + [f"data.source={world / 'corpus.jsonl'}", f"train.seed={seed}",
                                                 f"name=sort-base-{seed}"])
    ctx = run_pipeline(recipe, out / f"seed{seed}" / "base", raw=raw)
    data = apply_overrides(load_yaml(RECIPE), [f"data.train={world / 'sft.jsonl'}", f"train.steps={steps}",
                                               f"train.seed={seed}"])
    cfg = FinetuneConfig.from_dict({**data, "base": str(out / f"seed{seed}" / "base" / "model"),
                                    "out": str(out / f"seed{seed}" / "sft")})
    rows = compare_methods(ctx.artifacts["model"], ctx.artifacts["tokenizer"], cfg, cfg.out)
    return [{"seed": seed, **r} for r in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/lora-vs-dora")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=30, help="fine-tuning steps per method")
    args = parser.parse_args(argv)
    out = Path(args.out)
    rows = [r for seed in args.seeds for r in run_seed(seed, out, args.steps)]
    table = ["| seed | method | trainable | trainable % | val loss | exact match |", "|---|---|---|---|---|---|"]
    table += [f"| {r['seed']} | {r['method']} | {r['trainable']:,} | {r['trainable_percent']:.2f} | "
              f"{r['val_loss']:.3f} | {r['exact_match']:.3f} |" for r in rows]
    write_text_atomic(out / "results.md", "\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
