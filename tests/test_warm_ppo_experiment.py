"""experiments/warm_ppo.py --quick end to end: the arms' rewards are what they claim (the
single RM is the best member on the validation pairs, WARM the float64 mean of the members),
every arm starts from one policy and one rollout seed, and the win rates equal a count by
hand from the gold reward of each policy's own greedy answers."""
import json
from pathlib import Path

import pytest
import torch

from experiment_module import load_experiment


def load():
    return load_experiment('warm_ppo')


def test_smoothing_tail_and_verdict_by_hand():
    exp = load()
    assert exp.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert exp.tail_mean([1.0, 2.0, 3.0, 5.0], 2) == 4.0

    def rows(greedy, sampled):
        return [{"arm": "WARM", "seed": i, "win_rate_vs_single": g, "win_rate_vs_single_sampled": m}
                for i, (g, m) in enumerate(zip(greedy, sampled))]

    # 0.6, 0.7, 0.8: mean 0.7, standard error 0.1 / sqrt(3) = 0.0577: 0.7 - 0.115 > 0.5 but
    # 0.7 + 0.115 > 0.794 too, so the paper's value is within reach.
    assert exp.verdict(rows([0.6, 0.7, 0.8], [0.6, 0.7, 0.8])).startswith("reproduced: ")
    assert exp.verdict(rows([0.6, 0.62, 0.64], [0.6, 0.62, 0.64])).startswith("direction reproduced")
    assert exp.verdict(rows([0.608, 0.308, 0.512], [0.6, 0.6, 0.6])).startswith("not reproduced")
    assert exp.verdict(rows([0.3, 0.32, 0.34], [0.3, 0.32, 0.34])).startswith("reversed")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    exp = load()
    out = tmp_path_factory.mktemp("warm-ppo")
    assert exp.main(["--quick", "--out", str(out), "--seeds", "0"]) == 0
    return exp, out


def test_quick_run_writes_every_arm_and_seed(quick):
    exp, out = quick
    data = json.loads((out / "results.json").read_text())
    (r,) = data["results"]
    assert set(r["arms"]) == {"single", "warm", "baklava"} and set(r["win_rates"]) == {"warm", "baklava"}
    for arm in r["arms"].values():
        assert [p["iteration"] for p in arm["curve"]] == [1, 2, 3, 4]  # one optimizer step per rollout
        assert all(isinstance(p["gold"], float) and isinstance(p["proxy"], float) for p in arm["curve"])
    # One start policy, one rollout seed: the first rollout is the same samples in every arm,
    # so its gold reward is the same (the proxies differ: other reward models).
    firsts = {arm: a["curve"][0] for arm, a in r["arms"].items()}
    assert len({round(p["gold"], 9) for p in firsts.values()}) == 1
    assert len({a["before"]["gold_dense"] for a in r["arms"].values()}) == 1
    for w in r["win_rates"].values():  # the last checkpoint is the final policy
        assert [p["iteration"] for p in w["over_training"]] == [2, 4]
        assert w["over_training"][-1]["greedy"] == w["greedy"]["win_rate"]
        assert w["over_training"][-1]["sampled"] == w["sampled"]["win_rate"]
    assert r["rewards"]["baklava"]["starts"] == ["step-2", "step-4"]  # QUICK: 2 members, checkpoints 2 and 4
    assert (out / "warm_ppo.png").read_bytes()[:4] == b"\x89PNG"
    rows = exp.rows_of(data["results"], exp.QUICK)
    assert [(row["arm"], row["seed"]) for row in rows] == [("single best RM", 0), ("WARM", 0), ("Baklava WARM", 0)]
    assert rows[0]["win_rate_vs_single"] is None and 0 <= rows[1]["win_rate_vs_single"] <= 1
    # The unified result form (lmlab.report.results): the same rows, a summary per arm.
    written = json.loads((out / "experiment.json").read_text())
    assert written["schema"] == "lmlab.experiment/1" and written["name"] == "warm-ppo"
    assert [(row["arm"], row["seed"]) for row in written["rows"]] == [(row["arm"], row["seed"]) for row in rows]
    assert [a["arm"] for a in written["summary"]] == ["single best RM", "WARM", "Baklava WARM"]
    assert set(written["extra"]["win_rate_over_training"]) == {"WARM vs single best RM",
                                                                "Baklava WARM vs single best RM"}
    assert written["verdict"] == exp.verdict(rows) and "0.794" in written["verdict"]
    assert "| WARM | 0 |" in (out / "results.md").read_text()


def test_rewards_are_the_best_member_and_the_weight_average(quick):
    from lmlab.checkpoint import load_state_dict
    from lmlab.rewards import ModelReward
    from lmlab.rewards.accuracy import pair_accuracy

    exp, out = quick
    (r,) = json.loads((out / "results.json").read_text())["results"]
    shared = r["rewards"]["shared"]
    val = exp.held_out_pairs(out / "seed0" / "base" / "world")["val"]
    accs = [pair_accuracy(ModelReward.from_dir(m), val) for m in shared["members"]]
    assert accs == pytest.approx([a["val"] for a in shared["member_accuracy"]], abs=1e-9)
    assert accs[shared["best"]] == max(accs)
    assert r["arms"]["single"]["reward"] == shared["members"][shared["best"]]
    members = [load_state_dict(Path(m) / "model.safetensors") for m in shared["members"]]
    warm = load_state_dict(Path(shared["warm"]) / "model.safetensors")
    for k, v in warm.items():
        assert torch.equal(v, (sum(m[k].double() for m in members) / len(members)).to(v.dtype)), k


def test_win_rate_equals_a_count_by_hand(quick):
    from lmlab.data.chat import read_prompts
    from lmlab.eval.gold import answer_prompts
    from lmlab.eval.win_rate import Policy
    from lmlab.worlds.evaluate import sort_rewards

    exp, out = quick
    (r,) = json.loads((out / "results.json").read_text())["results"]
    seed_dir = out / "seed0"
    prompts = read_prompts(seed_dir / "base" / "world" / "eval.jsonl")[:exp.QUICK.eval_n]
    gold = {}
    for arm in ("warm", "single"):
        policy = Policy.from_dir(seed_dir / f"ppo-{arm}" / "model")
        answers, reasons = answer_prompts(policy.model, policy.tokenizer, prompts, template=policy.template,
                                          max_new_tokens=exp.QUICK.max_new_tokens)
        gold[arm] = sort_rewards(prompts, answers, reasons)["gold_dense"]
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(gold["warm"], gold["single"])]
    assert r["win_rates"]["warm"]["greedy"]["win_rate"] == pytest.approx(sum(outcomes) / len(outcomes))
    assert r["win_rates"]["warm"]["sampled"]["prompts"] == len(prompts) * exp.QUICK.win_samples
