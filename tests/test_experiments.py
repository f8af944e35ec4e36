"""The experiment scripts run end to end at toy scale (their numbers are in docs/experiments.md)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_proxy_tuning_experiment_runs(tmp_path):
    exp = load("proxy_tuning")
    assert exp.main(["--out", str(tmp_path), "--keys", "20", "--pretrain-steps", "20", "--tune-steps", "5"]) == 0
    (result,) = json.loads((tmp_path / "results.json").read_text())
    assert set(result["proxy"]) == {"0.0", "0.5", "1.0", "1.5", "2.0"}
    assert 0 <= result["large"] <= 1 and "| token |" in (tmp_path / "results.md").read_text()


def test_proxy_alpha_zero_is_the_base(tmp_path):
    """At α = 0 the proxy-tuned model is the base model, so their scores must agree."""
    exp = load("proxy_tuning")
    exp.main(["--out", str(tmp_path), "--keys", "12", "--pretrain-steps", "5", "--tune-steps", "2"])
    (result,) = json.loads((tmp_path / "results.json").read_text())
    assert result["proxy"]["0.0"] == result["large"]


@pytest.mark.slow
def test_lora_vs_dora_experiment_runs(tmp_path, monkeypatch):
    exp = load("lora_vs_dora")
    monkeypatch.setattr(exp, "PRETRAIN", exp.PRETRAIN + ["train.steps=5"])
    assert exp.main(["--out", str(tmp_path), "--steps", "2", "--lrs", "0.01", "0.03"]) == 0
    table = (tmp_path / "results.md").read_text()
    assert all(f"| 0 | {m} | {lr} |" in table for m, lr in (("full", "0.002"), ("lora", "0.01"), ("lora", "0.03"),
                                                               ("dora", "0.01"), ("dora", "0.03")))
    assert "| method | best lr |" in table


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
    assert "| moe | 2 |" in (tmp_path / "results.md").read_text()
