"""experiments/warm.py: its pure parts (accuracy, barrier, the clean/noisy pair alignment,
checked against the labeller's own probabilities) on the default tier, the whole --quick
run on the slow tier."""
import json
import math

import numpy as np
import pytest
import torch

from experiment_module import load_experiment


def load():
    return load_experiment('warm')


def test_accuracy_and_barrier_by_hand():
    exp = load()
    assert exp.accuracy(np.array([1.0, -2.0, 0.0, 3.0])) == 0.625  # a tie counts half
    assert exp.accuracy(np.array([])) is None
    assert exp.barrier([0.8, 0.5, 0.6]) == pytest.approx(0.2)  # the line is 0.8, 0.7, 0.6
    assert exp.barrier([0.6, 0.7, 0.8]) == pytest.approx(0.0)


def test_noisy_and_clean_exports_align_and_flips_match_the_labeller(tmp_path):
    from lmlab.worlds.export import export_world
    from lmlab.worlds.labeller import LabellerConfig, prob_first_preferred
    from lmlab.worlds.sort import parse_prompt

    exp = load()
    flip = 0.25
    export_world("sort", tmp_path / "clean", seed=3, n=300)
    export_world("sort", tmp_path / "noisy", seed=3, n=300, labeller=LabellerConfig(flip_rate=flip))
    sets = exp.eval_sets(tmp_path / "noisy", tmp_path / "clean")
    clean = [json.loads(x) for x in (tmp_path / "clean/preferences_train.jsonl").read_text().splitlines()]
    noisy = [json.loads(x) for x in (tmp_path / "noisy/preferences_train.jsonl").read_text().splitlines()]
    flipped = [n for n, c in zip(noisy, clean) if n["chosen"] != c["chosen"]]
    assert sets["memorised"].chosen == [f["chosen"] for f in flipped]  # scored against the flipped label
    assert len(sets["id"].prompts) + len(sets["val"].prompts) == len(
        (tmp_path / "clean/preferences_test_id.jsonl").read_text().splitlines())
    # With the same draw u per pair, the labels disagree with probability |P' - p| =
    # flip * |1 - 2p| (p: the clean labeller's probability), so the count of flipped pairs
    # is a sum of Bernoullis with known means.
    cfg = LabellerConfig()
    probs = [flip * abs(1 - 2 * prob_first_preferred(parse_prompt(c["prompt"]), c["chosen"], c["rejected"], cfg))
             for c in clean]
    mean, sd = sum(probs), math.sqrt(sum(q * (1 - q) for q in probs))
    assert abs(len(flipped) - mean) < 4 * sd, (len(flipped), mean, sd)
    assert 0 < len(flipped) < flip * len(clean)


@pytest.mark.slow
def test_warm_experiment_quick_runs_end_to_end(tmp_path):
    exp = load()
    assert exp.main(["--quick", "--out", str(tmp_path), "--seeds", "0", "1"]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    results = data["results"]
    assert [(r["seed"], r["flip_rate"]) for r in results] == [(0, 0.0), (0, 0.25), (1, 0.0), (1, 0.25)]
    for r in results:
        assert {"single_best", "single_mean", "ens2", "warm2", "ens3", "warm3"} <= set(r["accuracy"])
        assert all(0 <= r["accuracy"]["warm3"][k] <= 1 for k in ("train_noisy", "train_clean", "id", "ood"))
        assert (r["accuracy"]["warm3"]["memorised"] is None) == (r["flip_rate"] == 0)
        assert (r["n_flipped"] == 0) == (r["flip_rate"] == 0)
        bon = r["best_of_n"]["warm3"]
        assert [p["n"] for p in bon] == [1, 2, 4, 8] and bon[0]["kl"] == 0.0
        # n = 1 is one random sample whatever the reward: the pool's mean gold reward.
        assert len({round(r["best_of_n"][k][0]["gold"], 9) for k in r["best_of_n"]}) == 1
        assert len(r["lmc"]["shared_init"]) == 3 and r["lmc"]["barrier"]["shared_init"] >= 0
    md = (tmp_path / "details.md").read_text()
    assert "| warm3 | 1 |" in md and "| **warm3** | mean |" in md
    unified = json.loads((tmp_path / "experiment.json").read_text())
    assert unified["schema"] == "lmlab.experiment/1" and unified["verdict"].split()[0] in (
        "reproduced", "partly", "not")
    assert {(r["arm"], r["seed"]) for r in unified["rows"]} >= {("warm3 @ 25% flipped", 0), ("single_best @ 0% flipped", 1)}
    for png in ("best_of_n.png", "lmc.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_warm_experiment_smallest_configuration(tmp_path):
    """Default tier (a few seconds): two members, best-of-4, one seed, end to end."""
    exp = load()
    assert exp.main(["--quick", "--out", str(tmp_path), "--seeds", "0", "--members", "2", "--n-max", "4"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["flip_rate"] for r in results] == [0.0, 0.25]
    for r in results:
        assert set(r["accuracy"]) == {"member0", "member1", "single_best", "single_mean", "ens2", "warm2"}
        assert [p["n"] for p in r["best_of_n"]["warm2"]] == [1, 2, 4]
    # ENS-2's accuracies (averaged member margins) equal those of lmlab's EnsembleReward
    # over the two saved members, scored afresh.
    from lmlab.rewards import EnsembleReward, ModelReward

    flip = tmp_path / "seed0" / "flip0.25"
    ens = EnsembleReward([ModelReward.from_dir(flip / f"m{i}" / "model") for i in range(2)])
    sets = exp.eval_sets(tmp_path / "seed0" / "world-flip0.25", tmp_path / "seed0" / "base" / "world")
    for key in ("train_noisy", "id", "ood"):
        assert results[1]["accuracy"]["ens2"][key] == pytest.approx(exp.accuracy(sets[key].margins(ens)), abs=1e-9)
    # The cached seed is reused: a second call with the same settings recomputes nothing.
    stamp = (tmp_path / "seed0" / "seed_results.json").stat().st_mtime_ns
    assert exp.main(["--quick", "--out", str(tmp_path), "--seeds", "0", "--members", "2", "--n-max", "4"]) == 0
    assert (tmp_path / "seed0" / "seed_results.json").stat().st_mtime_ns == stamp


def test_warm_experiment_baklava_arm(tmp_path):
    """--baklava adds a second member set started from the SFT run's step checkpoints
    (QUICK: 3 steps, a checkpoint each; two members start from the first and the last),
    reported beside the shared-init rows and averaged by WARM."""
    from lmlab.checkpoint import load_state_dict

    exp = load()
    assert exp.main(["--quick", "--out", str(tmp_path), "--seeds", "0", "--members", "2", "--n-max", "4",
                     "--flips", "0.25", "--baklava"]) == 0
    (r,) = json.loads((tmp_path / "results.json").read_text())["results"]
    assert {"bkl_member0", "bkl_member1", "bkl_single_best", "bkl_ens2", "bkl_warm2"} <= set(r["accuracy"])
    assert {"bkl_single", "bkl_ens2", "bkl_warm2"} <= set(r["best_of_n"]) and len(r["lmc"]["baklava"]) == 3
    flip = tmp_path / "seed0" / "flip0.25"
    shared = [load_state_dict(flip / f"m{i}" / "model" / "model.safetensors") for i in range(2)]
    bkl = [load_state_dict(flip / "baklava" / f"member-{i}" / "model" / "model.safetensors") for i in range(2)]
    # The Baklava probe is the shared one retrained with the same settings: bit for bit equal.
    assert all(torch.equal(a, b) for a, b in zip(
        load_state_dict(flip / "probe" / "model" / "model.safetensors").values(),
        load_state_dict(flip / "baklava" / "probe" / "model" / "model.safetensors").values()))
    key = "transformer.embed.weight"
    assert not torch.equal(bkl[0][key], shared[0][key])  # member 0 started from step-1, not the final SFT
    warm = load_state_dict(flip / "bkl_warm2" / "model.safetensors")
    assert torch.equal(warm[key], ((bkl[0][key].double() + bkl[1][key].double()) / 2).to(warm[key].dtype))
    assert "| bkl_warm2 | 0 |" in (tmp_path / "details.md").read_text()
    assert "| bkl_warm2 @ 25% flipped | 0 |" in (tmp_path / "results.md").read_text()


def test_warm_verdict_from_rows():
    exp = load()

    def rows(w, e, single):
        at = " @ 25% flipped"
        return [{"arm": a + at, "seed": 0, "train_clean": v, "ood": v} for a, v in
                (("warm10", w), ("ens10", e), ("single_best", single))]

    assert exp.verdict(rows(0.7, 0.69, 0.68), 10, 0.25).startswith("reproduced")
    # The doc's 3-seed means: ENS-10 0.694 > single 0.681, WARM-10 0.682.
    v = exp.verdict(rows(0.682, 0.694, 0.681), 10, 0.25)
    assert v.startswith("not reproduced") and "WARM-10 0.682, ENS-10 0.694, single 0.681" in v
