"""Architecture experiments on the embedded corpus, one command each:

    python experiments/architectures.py moe --out runs/moe-vs-dense --seeds 0 1 2
        MoE (8 experts, top-2) vs the dense model with the same *active* parameters
    python experiments/architectures.py layerwise --out runs/layerwise-vs-uniform --seeds 0 1 2
        OpenELM layer-wise scaling vs uniform widths at (nearly) the same total parameters

Each arm is a recipe in this folder (runnable alone with `lmlab pretrain --config`). All arms
and seeds share one tokenizer (trained by the first run) and the same data, steps and
optimizer; the seed sets the initialisation and the batch order. The script writes into
--out the unified form (experiment.json and results.md: the paper's claim, every seed, mean
± std per arm, the verdict; `lmlab report OUT` shows them), details.md (every seed with
parameters and FLOPs, then the mean per arm), results.json and val_vs_flops.png
(validation loss against training FLOPs).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from lmlab.io import write_text_atomic
from lmlab.hub import load_model
from lmlab.pipeline import load_recipe, run_pipeline
from lmlab.report.results import Claim, command_line, paired, write_results
from lmlab.summary import parameter_counts, training_flops_per_token
from lmlab.train.plot import plot_val_vs_flops, read_metrics

HERE = Path(__file__).resolve().parent
# experiment -> (title, {arm label: recipe file}); the dense micro model is the baseline of both.
EXPERIMENTS = {
    "moe": ("MoE vs dense at equal active parameters", {"dense": "arch-dense.yaml", "moe": "arch-moe.yaml"}),
    "layerwise": ("layer-wise scaling vs uniform widths at equal total parameters",
                  {"uniform": "arch-dense.yaml", "layerwise": "arch-layerwise.yaml"}),
}
MOE_METRICS = ("moe_aux_loss", "moe_z_loss", "moe_load_imbalance")
CLAIMS = {
    "moe": Claim(source="Jiang et al. 2024 (Mixtral)",
                 statement="a sparse mixture of experts (8 experts, top-2) beats a dense model with the same "
                           "active parameters, i.e. the same compute per token.",
                 paper_figure="Mixtral 8x7B, 13B of its 47B parameters active per token, matches or outperforms "
                              "Llama 2 70B on most benchmarks"),
    "layerwise": Claim(source="Mehta et al. 2024 (OpenELM)",
                       statement="layer-wise scaling (heads and FFN width growing with depth) beats uniform "
                                 "widths at the same parameter count.",
                       paper_figure="OpenELM at ~1.1B parameters is 2.36% more accurate than OLMo 1.2B with 2x "
                                    "fewer pretraining tokens"),
}
METRICS = ["val_loss", "train_loss", "total", "active", "training_flops", "tokens_per_s", "moe_load_imbalance"]


def run_arm(arm: str, recipe_file: str, seed: int, out: Path, tokenizer: Path | None,
            overrides: list[str]) -> dict:
    sets = [*overrides, f"train.seed={seed}"] + ([f"data.tokenizer={tokenizer}"] if tokenizer else [])
    recipe, raw = load_recipe(HERE / recipe_file, sets)
    run_dir = out / f"{arm}-seed{seed}"
    pretrain = run_pipeline(recipe, run_dir, raw=raw).path("pretrain")
    cfg = load_model(pretrain / "model").config
    counts = parameter_counts(cfg)
    tokens_per_step = recipe.train.batch_size * recipe.data.seq_len
    records = read_metrics(pretrain)
    val = [r for r in records if "val_loss" in r]
    last = [r for r in records if "loss" in r][-1]
    return {"arm": arm, "seed": seed, "run": str(pretrain), "total": counts["total"], "active": counts["active"],
            "flops_per_step": training_flops_per_token(cfg, recipe.data.seq_len) * tokens_per_step,
            "steps": last["step"], "val_loss": val[-1]["val_loss"] if val else None,
            "train_loss": last["loss"], "tokens_per_s": last["tokens_per_s"],
            **{k: last[k] for k in MOE_METRICS if k in last}}


def results_table(rows: list[dict]) -> list[str]:
    table = ["| arm | seed | parameters | active | training FLOPs | steps | val loss | train loss | tokens/s "
             "| load max/mean |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        val = f"{r['val_loss']:.3f}" if r["val_loss"] is not None else "-"
        load = f"{r['moe_load_imbalance']:.2f}" if "moe_load_imbalance" in r else "-"
        table.append(f"| {r['arm']} | {r['seed']} | {r['total']:,} | {r['active']:,} | "
                     f"{r['flops_per_step'] * r['steps']:.3g} | {r['steps']} | {val} | {r['train_loss']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {load} |")
    table += ["", "| arm | seeds | mean val loss | min | max |", "|---|---|---|---|---|"]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        vals = [r["val_loss"] for r in rows if r["arm"] == arm and r["val_loss"] is not None]
        if vals:
            table.append(f"| {arm} | {len(vals)} | {statistics.fmean(vals):.3f} | {min(vals):.3f} | {max(vals):.3f} |")
    return table


def verdict(rows: list[dict], baseline: str, challenger: str) -> str:
    """The paper's claim is that `challenger` reaches the lower validation loss; decided from
    the mean over seeds and the seed-by-seed wins together."""
    p = paired(rows, "val_loss", baseline, challenger)
    n = p["n"]
    if not n:
        return "not measured: no seed has a validation loss for both arms (set train.eval_every)"
    lower = p["b_below"]
    if p["mean_b"] < p["mean_a"] and lower > n / 2:
        label = "reproduced"
    elif p["mean_a"] < p["mean_b"] and p["b_above"] > n / 2:
        label = "not reproduced"
    else:
        label = "mixed"
    return (f"{label}: mean validation loss {baseline} {p['mean_a']:.3f} vs {challenger} {p['mean_b']:.3f}; "
            f"{challenger} lower in {lower} of {n} seed{'s' * (n != 1)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--out", default=None, help="output folder (default runs/<experiment>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key in every arm, e.g. train.steps=60")
    args = parser.parse_args(argv)
    title, arms = EXPERIMENTS[args.experiment]
    out = Path(args.out or f"runs/{args.experiment}")
    rows, tokenizer = [], None
    for seed in args.seeds:
        for arm, recipe_file in arms.items():
            rows.append(run_arm(arm, recipe_file, seed, out, tokenizer, args.set))
            tokenizer = tokenizer or Path(rows[-1]["run"]).parent / "tokenizer" / "tokenizer.json"
    plot_val_vs_flops({arm: [(r["run"], r["flops_per_step"]) for r in rows if r["arm"] == arm] for arm in arms},
                      out / "val_vs_flops.png", title=title)
    table = results_table(rows)
    write_text_atomic(out / "details.md", f"{title}\n\n" + "\n".join(table) + "\n")
    write_text_atomic(out / "results.json", json.dumps(rows, indent=2))
    baseline, challenger = arms
    ours = verdict(rows, baseline, challenger)
    write_results(out, name=args.experiment, title=title, claim=CLAIMS[args.experiment],
                  command=command_line(__file__, argv), metrics=METRICS,
                  rows=[{**r, "training_flops": r["flops_per_step"] * r["steps"]} for r in rows],
                  verdict=ours, figures=["val_vs_flops.png"],
                  notes=f"Lower validation loss is better. {baseline} is the baseline; every arm and seed "
                        "shares one tokenizer, the data, the steps and the optimizer (details.md has the "
                        "parameters and FLOPs of every run).")
    print("\n".join(table))
    print(ours)
    print(f"plot -> {out / 'val_vs_flops.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
