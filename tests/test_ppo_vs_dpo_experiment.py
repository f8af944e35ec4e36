"""experiments/ppo_vs_dpo.py: the verifier's relabelling of the world's pairs (against the
world's own ideal answers) on the default tier; the whole --quick run on the slow tier."""
import json

import pytest

from experiment_module import load_experiment


def load():
    return load_experiment('ppo_vs_dpo')


def test_verifier_relabels_the_other_models_pairs(tmp_path):
    from lmlab.data.preference import read_preference_jsonl
    from lmlab.worlds.export import export_world
    from lmlab.worlds.sort import parse_prompt

    exp = load()
    export_world("sort", tmp_path / "world", seed=1, n=200)
    original = read_preference_jsonl(tmp_path / "world" / "preferences_train.jsonl").pairs
    assert exp.other_model_pairs(tmp_path, "learned_rm") == original  # the RM's pairs, as labelled
    pairs = exp.other_model_pairs(tmp_path, "verifiable")
    # The sparse verifier passes exactly the sorted symbols, so a kept pair is the ideal
    # answer against anything else, whichever side the noisy labeller had put it on.
    ideal = {p.prompt: parse_prompt(p.prompt).ideal for p in original}
    expected = [(p.prompt, ideal[p.prompt], p.rejected if p.chosen == ideal[p.prompt] else p.chosen)
                for p in original if (p.chosen == ideal[p.prompt]) != (p.rejected == ideal[p.prompt])]
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == expected
    assert 0 < len(pairs) < len(original)
    assert any(p.rejected == ideal[p.prompt] for p in original)  # some labels were turned round


@pytest.mark.slow
def test_quick_run_writes_every_task_method_and_seed(tmp_path):
    exp = load()
    assert exp.main(["--quick", "--out", str(tmp_path), "--seeds", "0", "1"]) == 0
    data = json.loads((tmp_path / "experiment.json").read_text())
    assert data["schema"] == "lmlab.experiment/1" and data["metrics"] == list(exp.METRICS)
    rows = data["rows"]
    assert [(r["seed"], r["task"], r["method"]) for r in rows] == [
        (seed, task, method) for seed in (0, 1) for task in exp.TASKS for method in exp.METHODS]
    for r in rows:
        assert 0 <= r["exact_match"] <= 1 and -1 <= r["gold_dense"] <= 1 and r["seconds"] > 0
        assert isinstance(r["kl_to_sft"], float) and r["arm"].endswith(exp.LABELS[r["method"]])
    # Online and DPO policies were written where the table says, and open as models.
    from lmlab.hub import load_model

    load_model(tmp_path / "seed1" / "learned_rm" / "ppo" / "model")
    load_model(tmp_path / "seed1" / "verifiable" / "iterative_dpo" / "model")
    assert (tmp_path / "seed0" / "verifiable" / "sft_dpo" / "sft_first" / "model" / "config.json").is_file()
    assert [a["arm"] for a in data["summary"]] == [r["arm"] for r in rows[:len(rows) // 2]]
    assert all(a["n"] == 2 for a in data["summary"])
    assert data["figures"] == ["gold_by_method.png"] and data["verdict"].startswith("verifiable")
    md = (tmp_path / "results.md").read_text()
    assert md.count("| learned RM | ") == 1 + len(exp.METHODS)  # the SFT row and one per method
    assert (tmp_path / "gold_by_method.png").read_bytes()[:4] == b"\x89PNG"
    # A rerun with the same settings reuses every arm's cached row.
    stamp = (tmp_path / "seed0" / "verifiable" / "ppo" / "row.json").stat().st_mtime_ns
    assert exp.main(["--quick", "--out", str(tmp_path), "--seeds", "0", "--methods", "ppo"]) == 0
    assert (tmp_path / "seed0" / "verifiable" / "ppo" / "row.json").stat().st_mtime_ns == stamp


def test_verdict_and_learning_rate_choice_by_hand():
    exp = load()
    # The verifiable task is judged by exact match, the learned-RM task by the dense gold reward.
    rows = [{"task": "verifiable", "method": m, "exact_match": g, "gold_dense": 0.0} for m, gs in
            (("ppo", (0.9, 0.92)), ("grpo", (0.95, 0.95)), ("dpo_own", (0.80, 0.84)), ("iterative_dpo", (0.85, 0.85)))
            for g in gs]
    rows += [{"task": "learned_rm", "method": m, "gold_dense": g, "exact_match": 1.0} for m, gs in
             (("ppo", (0.70, 0.80)), ("dpo_other", (0.76, 0.76))) for g in gs]
    text = exp.verdict(rows, {"gold_dense": 0.8, "exact_match": 0.5})
    # verifiable: PPO 0.91 vs iterative DPO 0.85, a gap of 0.06 > the larger std (0.0283);
    # learned RM: 0.75 vs 0.76, a gap of 0.01 < PPO's std 0.0707.
    assert text == ("verifiable (sparse gold), exact match: PPO 0.910 (SFT 0.500) vs best DPO-family iterative DPO "
                    "0.850: PPO ahead; GRPO ahead of PPO (0.950); learned RM, dense gold reward: PPO 0.750 (SFT "
                    "0.800) vs best DPO-family DPO, other model's pairs 0.760: tie within the seed spread (means over "
                    "seeds).")
    tune = [{"task": "verifiable", "method": "ppo", "lr": lr, "exact_match": em, "gold_dense": g}
            for lr, em, g in ((1e-5, 0.5, 0.9), (1e-4, 0.6, 0.8), (3e-4, 0.6, 0.85), (1e-3, 0.6, 0.85))]
    tune += [{"task": "learned_rm", "method": "ppo", "lr": lr, "exact_match": em, "gold_dense": g}
             for lr, em, g in ((1e-5, 0.1, 0.9), (1e-4, 0.6, 0.8))]
    # exact match ties at 0.6, then dense gold ties at 0.85: the smaller rate; the RM task by gold.
    assert exp.best_lrs(tune) == {"verifiable.ppo": 3e-4, "learned_rm.ppo": 1e-5}
