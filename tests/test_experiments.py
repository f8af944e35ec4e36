"""The experiment scripts run end to end at toy scale (their numbers are in docs/experiments.md)
and write the unified result form (lmlab.report.results) with a verdict computed from the rows."""
import json
import math
import statistics
from pathlib import Path

import pytest

from experiment_module import load_experiment


def load(name):
    return load_experiment(name)


def unified(out: Path, arms_seeds: list[tuple[str, int]], script: str, report: bool = True) -> dict:
    """experiment.json is the unified form with exactly one row per expected (arm, seed), a
    claim, the command that ran and a verdict; the report shows it as its claim section."""
    from lmlab.report import build_report

    result = json.loads((out / "experiment.json").read_text())
    assert result["schema"] == "lmlab.experiment/1"
    assert [(r["arm"], r["seed"]) for r in result["rows"]] == arms_seeds
    assert result["claim"]["source"] and result["claim"]["statement"] and result["verdict"]
    assert result["command"].startswith(f"python experiments/{script}.py ")
    assert [s["n"] for s in result["summary"]] == [sum(a == arm for a, _ in arms_seeds)
                                                    for arm in dict.fromkeys(a for a, _ in arms_seeds)]
    assert result["verdict"] in (out / "results.md").read_text()
    if report:
        html = build_report(out).read_text()
        assert "Claim and verdict" in html
    return result


@pytest.mark.slow
def test_proxy_tuning_experiment_runs(tmp_path):
    exp = load("proxy_tuning")
    assert exp.main(["--out", str(tmp_path), "--keys", "20", "--pretrain-steps", "20", "--tune-steps", "5"]) == 0
    (result,) = json.loads((tmp_path / "results.json").read_text())
    assert set(result["proxy"]) == {"0.0", "0.5", "1.0", "1.5", "2.0"}
    assert 0 <= result["large"] <= 1 and "| token |" in (tmp_path / "details.md").read_text()
    models = ["large base", "small base", "expert (small tuned)", "large tuned"]
    unified(tmp_path, [(a, 0) for a in models + [f"proxy α={a}" for a in ("0", "0.5", "1", "1.5", "2")]],
            "proxy_tuning")


def test_proxy_alpha_zero_is_the_base(tmp_path):
    """At α = 0 the proxy-tuned model is the base model, so their scores must agree."""
    exp = load("proxy_tuning")
    exp.main(["--out", str(tmp_path), "--keys", "12", "--pretrain-steps", "5", "--tune-steps", "2"])
    (result,) = json.loads((tmp_path / "results.json").read_text())
    assert result["proxy"]["0.0"] == result["large"]
    rows = {r["arm"]: r for r in unified(tmp_path, [(a, 0) for a in (
        "large base", "small base", "expert (small tuned)", "large tuned", "proxy α=0", "proxy α=0.5",
        "proxy α=1", "proxy α=1.5", "proxy α=2")], "proxy_tuning", report=False)["rows"]}
    assert rows["proxy α=0"]["exact_match"] == result["large"] == rows["large base"]["exact_match"]
    assert rows["proxy α=0"]["gap_closed"] in (0.0, None)  # None: the tuned model is not ahead here


@pytest.mark.slow
def test_lora_vs_dora_experiment_runs(tmp_path, monkeypatch):
    exp = load("lora_vs_dora")
    monkeypatch.setattr(exp, "PRETRAIN", exp.PRETRAIN + ["train.steps=5"])
    assert exp.main(["--out", str(tmp_path), "--steps", "2", "--lrs", "0.01", "0.03"]) == 0
    table = (tmp_path / "details.md").read_text()
    assert all(f"| 0 | {m} | {lr} |" in table for m, lr in (("full", "0.002"), ("lora", "0.01"), ("lora", "0.03"),
                                                               ("dora", "0.01"), ("dora", "0.03")))
    assert "| method | best lr |" in table
    result = unified(tmp_path, [(a, 0) for a in ("full lr=0.002", "lora lr=0.01", "dora lr=0.01", "lora lr=0.03",
                                                 "dora lr=0.03")], "lora_vs_dora")
    assert result["verdict"].startswith("not resolved (one seed)")


def test_architecture_experiment_runs(tmp_path):
    exp = load("architectures")
    sets = ["--set", "train.steps=2", "--set", "train.eval_every=1", "--set", "train.progress=false",
            "--set", "data.vocab_size=300", "--set", "train.batch_size=2"]
    assert exp.main(["moe", "--out", str(tmp_path), "--seeds", "0", "1", *sets]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["arm"], r["seed"]) for r in rows] == [("dense", 0), ("moe", 0), ("dense", 1), ("moe", 1)]
    dense, moe = rows[:2]
    assert moe["total"] > 2 * dense["total"] and abs(moe["active"] / dense["active"] - 1) < 0.01
    # Equal active parameters: the FLOPs axis differs only by the router.
    assert 1 < moe["flops_per_step"] / dense["flops_per_step"] < 1.01
    assert rows[0]["val_loss"] != rows[2]["val_loss"]  # the seed reaches the initialisation
    assert moe["moe_load_imbalance"] >= 1.0 and (tmp_path / "val_vs_flops.png").stat().st_size > 0
    assert "| moe | 2 |" in (tmp_path / "details.md").read_text()
    result = unified(tmp_path, [("dense", 0), ("moe", 0), ("dense", 1), ("moe", 1)], "architectures")
    assert result["figures"] == ["val_vs_flops.png"] and result["rows"][1]["training_flops"] == \
        moe["flops_per_step"] * moe["steps"]
    # The verdict quotes the means of the rows and the seeds MoE won, recomputed here.
    mean = {a: statistics.fmean(r["val_loss"] for r in rows if r["arm"] == a) for a in ("dense", "moe")}
    won = sum(rows[i + 1]["val_loss"] < rows[i]["val_loss"] for i in (0, 2))
    assert f"dense {mean['dense']:.3f} vs moe {mean['moe']:.3f}; moe lower in {won} of 2 seeds" in result["verdict"]


def test_ppo_ablation_runs_and_writes_the_unified_form(tmp_path):
    """Every configuration and seed from one tiny SFT policy, 1 rollout each."""
    import torch

    from lmlab.checkpoint import save_model
    from lmlab.model.transformer import build_model
    from lmlab.tokenizer import train_tokenizer
    from lmlab.worlds.export import export_world
    from rlkit import tiny_config

    export_world("sort", tmp_path / "world", seed=0, n=20)
    texts = [json.loads(line)["text"] for line in (tmp_path / "world" / "corpus.jsonl").read_text().splitlines()]
    tok = train_tokenizer(texts, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    save_model(build_model(tiny_config(vocab_size=tok.vocab_size, max_seq_len=64)), tmp_path / "sft" / "model",
               tokenizer=tok)
    exp = load("ppo_ablation")
    out = tmp_path / "out"
    assert exp.main(["--run", str(tmp_path), "--out", str(out), "--iterations", "1", "--prompts", "8",
                     "--seeds", "0", "1"]) == 0
    old = json.loads((out / "ablation.json").read_text())  # the script's own output is kept
    assert [(r["config"], r["seed"]) for r in old] == [(name, s) for name, _ in exp.STEPS for s in (0, 1)]
    result = unified(out, [("SFT policy", 0), ("SFT policy", 1)] + [(r["config"], r["seed"]) for r in old],
                     "ppo_ablation")
    assert result["rows"][0]["gold_dense"] == old[0]["before_gold_dense"]
    assert result["command"].endswith("--iterations 1 --prompts 8 --seeds 0 1")


def test_curation_without_training_writes_the_unified_form(tmp_path):
    exp = load("curation")
    texts = tmp_path / "texts.jsonl"
    words = "the cat sat on a mat while the dog ran far away from home and back again".split()
    with texts.open("w") as f:
        for i in range(40):
            body = " ".join(words[(i + k) % len(words)] for k in range(60)) + f" number {i}."
            f.write(json.dumps({"id": str(i), "text": f"{body}\n\n{body[::-1]}"}) + "\n")
    assert exp.main(["--out", str(tmp_path / "out"), "--texts", str(texts), "--chunk-chars", "0"]) == 0
    result = unified(tmp_path / "out", [("raw", 0), ("curated", 0)], "curation", report=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    raw, curated = result["rows"]
    assert (raw["documents"], curated["documents"]) == (report["documents"]["raw"], report["documents"]["curated"])
    assert raw["heldout_loss"] is None and result["verdict"].startswith("not measured: curation only")


# ---- verdicts, from hand-made rows: the label must follow the numbers --------------------

def test_architecture_verdict_follows_means_and_wins():
    exp = load("architectures")

    def rows(dense, moe):
        return [r for s, (d, m) in enumerate(zip(dense, moe)) for r in (
            {"arm": "dense", "seed": s, "val_loss": d}, {"arm": "moe", "seed": s, "val_loss": m})]

    # docs/experiments.md's three seeds at 1.5e-3
    got = exp.verdict(rows([4.971, 4.965, 5.012], [5.086, 5.072, 5.058]), "dense", "moe")
    assert got == "not reproduced: mean validation loss dense 4.983 vs moe 5.072; moe lower in 0 of 3 seeds"
    assert exp.verdict(rows([5.0, 5.0, 5.0], [4.9, 4.8, 5.1]), "dense", "moe").startswith("reproduced")
    # lower on average (4.95 < 5.0) but in only one seed of three: neither way
    assert exp.verdict(rows([5.0, 5.0, 5.0], [4.75, 5.05, 5.05]), "dense", "moe").startswith("mixed")
    assert exp.verdict([{"arm": "dense", "seed": 0, "val_loss": None}], "dense", "moe").startswith("not measured")


def test_lora_vs_dora_verdict_compares_each_at_its_best_rate():
    exp = load("lora_vs_dora")
    # docs/experiments.md, 2e-2 (both methods' best rate) and 3e-2, five seeds
    lora = {0.02: [0.650, 0.430, 0.840, 0.655, 0.835], 0.03: [0.140, 0.010, 0.030, 0.000, 0.000]}
    dora = {0.02: [0.955, 0.540, 0.875, 0.940, 0.630], 0.03: [0.860, 0.040, 0.640, 0.640, 0.240]}
    rows = [{"method": m, "lr": lr, "seed": s, "exact_match": x}
            for m, table in (("lora", lora), ("dora", dora)) for lr, xs in table.items() for s, x in enumerate(xs)]
    assert exp.best_rates(rows) == {"lora": (0.02, pytest.approx(0.682)), "dora": (0.02, pytest.approx(0.788))}
    # per-seed DoRA - LoRA: .305 .110 .035 .285 -.205, mean .106, sample sd .2082, s.e. .0931 (by hand)
    got = exp.verdict(rows)
    assert got.startswith("reproduced (about equal within two standard errors)")
    assert "LoRA 0.682 vs DoRA 0.788, DoRA − LoRA +0.106 ± 0.093 (s.e.); DoRA ahead in 4 of 5 seeds, LoRA in 1" in got
    apart = [{**r, "exact_match": r["exact_match"] + (0.3 if r["method"] == "dora" else 0)} for r in rows]
    assert exp.verdict(apart).startswith("not reproduced (DoRA better beyond two standard errors)")


def test_proxy_tuning_verdict_weighs_direction_and_gap():
    exp = load("proxy_tuning")

    def seed(s, large, tuned, proxy):
        gap = tuned - large
        return {"seed": s, "large": large, "large-tuned": tuned, "proxy": {"1.0": proxy},
                "gap_closed": (proxy - large) / gap if gap > 0 else None}

    # docs/experiments.md: seed 0 0.050 -> 0.283 (tuned 0.233), seed 1 0.017 -> 0.150 (tuned 0.400)
    got = exp.verdict([seed(0, 0.050, 0.233, 0.283), seed(1, 0.017, 0.400, 0.150)])
    assert got.startswith("partly reproduced")
    assert "ahead in 2 of 2 seeds; gap closed 127%, 35% (mean 81%; paper 88%)" in got
    assert exp.verdict([seed(0, 0.1, 0.5, 0.45), seed(1, 0.1, 0.3, 0.25)]).startswith("reproduced")
    assert exp.verdict([seed(0, 0.2, 0.5, 0.1), seed(1, 0.1, 0.3, 0.25)]).startswith("not reproduced")


def test_ppo_ablation_verdict_names_the_practice_that_adds_nothing():
    exp = load("ppo_ablation")
    gold = {"vanilla PPO": [0.90, 0.92, 0.94], "+ advantage normalisation": [0.93, 0.94, 0.97],
            "+ large batch": [0.96, 0.96, 0.98], "+ EMA reference": [0.97, 0.95, 0.98]}
    rows = [{"config": c, "seed": s, "gold_dense": g, "gold_sparse": None, "exact_match": None, "kl_to_sft": None,
             "before_gold_dense": 0.9, "seconds": 1.0} for c, gs in gold.items() for s, g in enumerate(gs)]
    got = exp.verdict(rows)
    # gains: +.03 +.02 +.03 (mean .0267, s.e. .0033), +.03 +.02 +.01 (.02, .0058), +.01 -.01 0 (0, .0058)
    assert got.startswith("partly reproduced: + EMA reference adds nothing measurable. gold (dense) vanilla PPO 0.920")
    assert "+ advantage normalisation 0.947 (+0.027 ± 0.003, up in 3 of 3)" in got
    assert "+ EMA reference 0.967 (+0.000 ± 0.006, up in 1 of 3)" in got and "SFT policy 0.900; 3 seeds" in got


def test_curation_verdict_compares_held_out_loss():
    exp = load("curation")
    result = {"documents": {"raw": 2004, "curated": 1472}, "chars": {"raw": 10, "curated": 7},
              "removal_by_noise_label": {"clean": {"input": 1003, "kept": 828, "removed_fraction": 0.1745}},
              "training": {"raw": {"heldout_loss": 6.008, "train_tokens": 300000},
                           "curated": {"heldout_loss": 5.673, "train_tokens": 300000}}}
    assert exp.verdict(result, 0) == ("reproduced: held-out loss curated 5.673 vs raw 6.008 nats/token at 300,000 "
                                      "training tokens each (seed 0, one seed); curation kept 1472 of 2004 "
                                      "documents, 828 of the 1003 clean ones")
    result["training"]["curated"]["heldout_loss"] = 6.5
    assert exp.verdict(result, 0).startswith("not reproduced")
    assert math.isclose(exp.unified_rows(result, 0)[1]["heldout_loss"], 6.5)


def test_proxy_tuning_verdict_says_which_seed_has_no_gap():
    exp = load("proxy_tuning")
    results = [{"seed": 0, "large": 0.2, "large-tuned": 0.2, "proxy": {"1.0": 0.3}, "gap_closed": None},
               {"seed": 1, "large": 0.1, "large-tuned": 0.3, "proxy": {"1.0": 0.25}, "gap_closed": 0.75}]
    got = exp.verdict(results)
    assert got.startswith("partly reproduced") and "gap closed n/a, 75% (mean 75%" in got
