"""Architecture experiments on the embedded corpus, one command each:

    python experiments/architectures.py moe --out runs/moe-vs-dense
        MoE (8 experts, top-2) vs the dense model with the same *active* parameters
    python experiments/architectures.py layerwise --out runs/layerwise-vs-uniform
        OpenELM layer-wise scaling vs uniform widths at (nearly) the same total parameters

Each arm is a recipe in this folder (runnable alone with `lmlab pretrain --config`). The arms
share one tokenizer (trained by the first arm) and the same data, steps and optimizer. The
script writes results.md (parameters, FLOPs, final validation loss, throughput) and
val_vs_flops.png (validation loss against training FLOPs) into --out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmlab.io import write_text_atomic
from lmlab.pipeline import load_recipe, run_pipeline
from lmlab.summary import parameter_counts, training_flops_per_token
from lmlab.train.plot import plot_val_vs_flops, read_metrics

HERE = Path(__file__).resolve().parent
EXPERIMENTS = {
    "moe": ("MoE vs dense at equal active parameters", ["dense", "moe"]),
    "layerwise": ("layer-wise scaling vs uniform widths at equal total parameters", ["uniform", "layerwise"]),
}


def run_arm(arm: str, out: Path, tokenizer: Path | None, overrides: list[str]) -> dict:
    sets = list(overrides) + ([f"data.tokenizer={tokenizer}"] if tokenizer else [])
    recipe, raw = load_recipe(HERE / f"arch-{arm}.yaml", sets)
    cfg = run_pipeline(recipe, out / arm, raw=raw).artifacts["model"].config
    counts = parameter_counts(cfg)
    tokens_per_step = recipe.train.batch_size * recipe.data.seq_len
    flops_per_step = training_flops_per_token(cfg, recipe.data.seq_len) * tokens_per_step
    records = read_metrics(out / arm)
    val = [r for r in records if "val_loss" in r]
    last = [r for r in records if "loss" in r][-1]
    return {"arm": arm, "total": counts["total"], "active": counts["active"],
            "flops_per_step": flops_per_step, "steps": last["step"],
            "val_loss": val[-1]["val_loss"] if val else None, "train_loss": last["loss"],
            "tokens_per_s": last["tokens_per_s"],
            **{k: last[k] for k in ("moe_aux_loss", "moe_z_loss", "moe_load_imbalance") if k in last}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--out", default=None, help="output folder (default runs/<experiment>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key in every arm, e.g. train.steps=60")
    args = parser.parse_args(argv)
    title, arms = EXPERIMENTS[args.experiment]
    out = Path(args.out or f"runs/{args.experiment}")
    rows, tokenizer = [], None
    for arm in arms:
        rows.append(run_arm(arm, out, tokenizer, args.set))
        tokenizer = tokenizer or out / arm / "tokenizer.json"
    plot_val_vs_flops({r["arm"]: (out / r["arm"], r["flops_per_step"]) for r in rows},
                      out / "val_vs_flops.png", title=title)
    table = ["| arm | parameters | active | training FLOPs | steps | val loss | train loss | tokens/s | load max/mean |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        val = f"{r['val_loss']:.3f}" if r["val_loss"] is not None else "-"
        load = f"{r['moe_load_imbalance']:.2f}" if "moe_load_imbalance" in r else "-"
        table.append(f"| {r['arm']} | {r['total']:,} | {r['active']:,} | {r['flops_per_step'] * r['steps']:.3g} | "
                     f"{r['steps']} | {val} | {r['train_loss']:.3f} | {r['tokens_per_s']:,.0f} | {load} |")
    write_text_atomic(out / "results.md", f"{title}\n\n" + "\n".join(table) + "\n")
    write_text_atomic(out / "results.json", json.dumps(rows, indent=2))
    print("\n".join(table))
    print(f"plot -> {out / 'val_vs_flops.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
