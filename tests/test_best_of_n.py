"""Best-of-N under any Reward, the expected best-of-n estimator against brute-force subset
enumeration, the analytic KL, and the rejection-sampling stage end to end on a tiny run."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.model.transformer import build_model
from lmlab.rewards import EnsembleReward, GoldReward
from lmlab.rewards.best_of_n import (
    SamplePool, best_of_n, chosen_records, expected_best_of_n, gold_pool, pick_best, powers_of_two,
    reward_from_spec, sample_pool, selection_probs,
)
from lmlab.train.rl import best_of_n_kl

from chartok import CharTokenizer


class CountReward:
    """A stub Reward with a known score: how many times the answer contains 'b', minus a
    hundredth of its length."""

    def __init__(self):
        self.calls = []

    def score(self, prompts, completions):
        self.calls.append(list(completions))
        return torch.tensor([c.count("b") - 0.01 * len(c) for c in completions])


def test_kl_formula_values():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(4) == pytest.approx(1.3862943611198906 - 0.75)
    assert best_of_n_kl(256) == pytest.approx(5.545177444479562 - 255 / 256)
    with pytest.raises(LmlabError, match="n >= 1"):
        best_of_n_kl(0)


def test_best_of_n_keeps_the_argmax_and_skips_empty_answers():
    pool = SamplePool(["p0", "p1", "p2"],
                      [["a", "bb", "b"], ["", "abab", "bbb x"], ["", "  ", ""]],
                      [["eos"] * 3, ["eos", "length", "eos"], ["eos"] * 3])
    reward = CountReward()
    picked = best_of_n(pool, reward)
    # Hand-computed: p0 -> "bb" (1.98), p1 -> "bbb x" (2.95 > 1.96); p2 has only empty answers.
    assert picked.index == [1, 2, None]
    assert picked.best_scores() == pytest.approx([1.98, 2.95, None])
    assert reward.calls == [["a", "bb", "b", "abab", "bbb x"]]  # empty answers never reach the reward
    assert np.isneginf(picked.scores[1, 0]) and picked.kl == pytest.approx(math.log(3) - 2 / 3)
    assert chosen_records(pool, picked) == [
        {"messages": [{"role": "user", "content": "p0"}, {"role": "assistant", "content": "bb"}]},
        {"messages": [{"role": "user", "content": "p1"}, {"role": "assistant", "content": "bbb x"}]}]
    assert pick_best(np.array([[1.0, 3.0, 3.0]])) == [1]  # first of equal scores


def test_best_of_n_takes_any_reward_gold_and_ensemble():
    pool = SamplePool(["sort: c a b"], [["a b c", "c b a", "a b c um um"]], [["eos"] * 3])
    assert best_of_n(pool, GoldReward("sort", ended=True)).index == [0]
    ens = EnsembleReward([CountReward(), CountReward()])
    assert best_of_n(pool, ens).index == [0]  # all have one "b": the shortest wins the length term
    np.testing.assert_allclose(gold_pool(pool)[0], [1.0, 0.5 + 0.3 * 0 + 0.2, 1.0 - 0.2], atol=1e-9)


def test_sample_pool_repeats_each_prompt_n_times_in_one_batch(monkeypatch):
    import lmlab.decode.generate as gen

    tok = CharTokenizer()
    cfg = ModelConfig(name="t", vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                      ffn_hidden=64, max_seq_len=64)
    model = build_model(cfg)
    seen = []
    real = gen.generate

    def spy(model, prompts, max_new_tokens, **kw):
        seen.append(len(prompts))
        return real(model, prompts, max_new_tokens, **kw)

    monkeypatch.setattr(gen, "generate", spy)
    pool = sample_pool(model, tok, ["sort: b a", "sort: c a d"], n=3, max_new_tokens=5, temperature=1.0, seed=1)
    assert seen == [6] and pool.n == 3 and len(pool.answers) == 2
    assert all(r in ("eos", "length") for row in pool.finish_reasons for r in row)
    again = sample_pool(model, tok, ["sort: b a", "sort: c a d"], n=3, max_new_tokens=5, temperature=1.0, seed=1,
                        batch_rows=6)
    assert again.answers == pool.answers  # seeded: the same pool
    sample_pool(model, tok, ["sort: b a", "sort: c a d"], n=3, max_new_tokens=5, batch_rows=4)
    assert seen[-2:] == [4, 2]


def brute_force(proxy, values, n):
    """Mean over every n-subset of the value of its proxy argmax (first index on ties)."""
    out = []
    for prow, vrow in zip(proxy, values):
        subsets = list(itertools.combinations(range(len(prow)), n))
        out.append(np.mean([vrow[max(s, key=lambda i: (prow[i], -i))] for s in subsets]))
    return float(np.mean(out))


def test_expected_best_of_n_matches_subset_enumeration_with_ties():
    rng = np.random.default_rng(0)
    proxy = rng.integers(0, 4, size=(3, 7)).astype(float)  # many ties
    values = rng.normal(size=(3, 7))
    got = expected_best_of_n(proxy, values, range(1, 8))
    for n in range(1, 8):
        assert got[n] == pytest.approx(brute_force(proxy, values, n), abs=1e-12), n
    assert got[1] == pytest.approx(values.mean())
    assert selection_probs(7, 3).sum() == pytest.approx(1.0)
    # An empty answer (-inf) adds nothing where it is never the maximum.
    inf = np.array([[-np.inf, 1.0, 2.0]])
    assert expected_best_of_n(inf, inf, [2, 3]) == {2: pytest.approx(5 / 3), 3: 2.0}
    assert powers_of_two(256)[-1] == 256 and powers_of_two(10) == [1, 2, 4, 8, 10]


def test_bad_inputs_are_one_clear_error(tmp_path):
    tok = CharTokenizer()
    cfg = ModelConfig(name="t", vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                      ffn_hidden=64, max_seq_len=64)
    model = build_model(cfg)
    with pytest.raises(LmlabError, match="n >= 1"):
        sample_pool(model, tok, ["sort: a b"], n=0, max_new_tokens=4)
    with pytest.raises(LmlabError, match="no prompts"):
        sample_pool(model, tok, [], n=2, max_new_tokens=4)
    with pytest.raises(LmlabError, match="reward must be"):
        reward_from_spec([])
    with pytest.raises(LmlabError, match="cannot be ensembled"):
        reward_from_spec(["gold", "x"])
    with pytest.raises(LmlabError, match="not found"):
        reward_from_spec(str(tmp_path / "nope"))


# ---------------------------------------------------------------------------------------
# The stage end to end
# ---------------------------------------------------------------------------------------

TINY = [
    "data.vocab_size=300", "data.seq_len=32", "data.val_fraction=0.1",
    "model={preset: nano, n_layers: 1, max_seq_len: 64}",
    "train={steps: 2, batch_size: 4, log_every: 1, progress: false, precision: float32}",
    "world.n=40",
    "sft.train={steps: 2, batch_size: 4, progress: false, precision: float32}", "sft.data.seq_len=64",
    "stages=[tokenizer, shards, pretrain, world, sft, rejection]",
    "rejection.n=3", "rejection.max_prompts=4", "rejection.max_new_tokens=6", "rejection.reward=gold",
    "rejection.sft.train={steps: 2, batch_size: 2, progress: false, precision: float32}",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from lmlab.pipeline import load_recipe, run_pipeline

    tmp = tmp_path_factory.mktemp("rej")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(f"sort: c a b answer: a b c {i} done." for i in range(200)))
    recipe, raw = load_recipe(None, [*TINY, f"data.source={corpus}"])
    run = tmp / "run"
    run_pipeline(recipe, run, raw=raw, echo=lambda *_: None)
    return run, [*TINY, f"data.source={corpus}"]


def test_rejection_stage_writes_its_outputs(tiny_run):
    from lmlab.hub import load_model

    run, _ = tiny_run
    out = run / "rejection"
    report = json.loads((out / "rejection.json").read_text())
    assert report["n"] == 3 and report["prompts"] == 4 and report["kl_best_of_n"] == pytest.approx(best_of_n_kl(3))
    assert report["sft"]["steps"] == 2 and (out / "stage.json").is_file()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    best = [json.loads(line) for line in (out / "best.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(len(s["answers"]) == 3 for s in samples)
    # Each chosen answer is its prompt's highest gold reward (the reward here is gold).
    chosen = iter(best)
    for s in samples:
        scored = [a for a in s["answers"] if a["reward"] is not None]
        if not scored:
            continue
        top = max(a["reward"] for a in scored)
        (pick,) = [a for a in s["answers"] if a["best"]]
        assert pick["reward"] == top
        assert next(chosen)["messages"][1]["content"] == pick["text"]
    assert report["chosen"] == len(best)
    gold_best = [a["gold"] for s in samples for a in s["answers"] if a["best"]]
    assert report["gold_best_mean"] == pytest.approx(np.mean(gold_best))
    assert load_model(out / "model").config == load_model(run / "sft/model").config


def test_rejection_recipe_with_a_reward_model_and_an_ensemble(tiny_run, tmp_path):
    from lmlab.hub import load_model
    from lmlab.model.heads import RewardModel
    from lmlab.rewards import save_reward_model
    from lmlab.stages.rejection import rejection_recipe
    from lmlab.tokenizer import Tokenizer

    run, _ = tiny_run
    tok = Tokenizer.load(run / "sft/model")
    for i in range(2):
        torch.manual_seed(i)
        rm = RewardModel.from_lm(load_model(run / "sft/model"), head_init_std=1.0)
        save_reward_model(rm, tmp_path / f"rm{i}", tokenizer=tok, extra={"reward": {"template": "lmlab"}})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"policy: {run / 'sft/model'}\nprompts: {run / 'world/eval.jsonl'}\nout: {tmp_path / 'out'}\n"
                      "n: 2\nmax_prompts: 3\nmax_new_tokens: 6\n"
                      "sft: {train: {steps: 1, batch_size: 2, progress: false, precision: float32}}\n")
    single = rejection_recipe(recipe, [f"reward={tmp_path / 'rm0'}", f"out={tmp_path / 'one'}"], log=lambda *_: None)
    assert single["prompts"] == 3 and single["reward"] == str(tmp_path / "rm0")
    ens = rejection_recipe(recipe, [f"reward=[{tmp_path / 'rm0'}, {tmp_path / 'rm1'}]"], log=lambda *_: None)
    assert ens["reward"] == [str(tmp_path / "rm0"), str(tmp_path / "rm1")] and ens["sft"]["steps"] == 1
    # The ensemble's chosen answer maximises the mean of the two members' scores.
    samples = [json.loads(line) for line in (tmp_path / "out/samples.jsonl").read_text().splitlines()]
    members = reward_from_spec([str(tmp_path / "rm0"), str(tmp_path / "rm1")])
    for s in samples:
        texts = [a["text"] for a in s["answers"] if a["reward"] is not None]
        means = members.member_scores([s["prompt"]] * len(texts), texts).mean(0)
        assert [a["text"] for a in s["answers"] if a["best"]] == [texts[int(means.argmax())]]


def test_rejection_bad_input_writes_nothing(tiny_run, tmp_path):
    from lmlab.stages.rejection import RejectionConfig, read_prompts, rejection_recipe

    run, _ = tiny_run
    recipe = tmp_path / "r.yaml"
    out = tmp_path / "out"
    recipe.write_text(f"policy: {run / 'sft/model'}\nprompts: {run / 'world/eval.jsonl'}\nout: {out}\n")
    # A language-model directory is not a reward model.
    with pytest.raises(LmlabError, match="not a reward model"):
        rejection_recipe(recipe, [f"reward={run / 'sft/model'}"], log=lambda *_: None)
    with pytest.raises(LmlabError, match="n >= 1"):
        rejection_recipe(recipe, ["n=0"], log=lambda *_: None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(LmlabError, match="no prompts"):
        rejection_recipe(recipe, [f"prompts={empty}"], log=lambda *_: None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "sort: a b"}\n{"text": 1}\n')
    with pytest.raises(LmlabError, match=r"bad.jsonl:2"):
        read_prompts(bad, 10)
    with pytest.raises(LmlabError, match="policy"):
        rejection_recipe(recipe, ["policy="], log=lambda *_: None)
    assert not out.exists()
    assert RejectionConfig(reward=["a", "b"]).reward == ("a", "b")


def test_cli_wires_rejection_sampling(tiny_run, tmp_path, capsys):
    from lmlab.cli import main

    run, _ = tiny_run
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"policy: {run / 'sft/model'}\nprompts: {run / 'world/sft.jsonl'}\nout: {tmp_path / 'o'}\n"
                      "n: 2\nmax_prompts: 2\nmax_new_tokens: 4\n"
                      "sft: {train: {steps: 1, batch_size: 2, progress: false, precision: float32}}\n")
    assert main(["align", "rejection-sampling", "--config", str(recipe)]) == 0
    assert "best-of-2" in capsys.readouterr().out and (tmp_path / "o/model/config.json").is_file()
    assert main(["align", "rejection-sampling", "--config", str(recipe), "--set", f"reward={run / 'sft/model'}",
                 "--set", f"out={tmp_path / 'o2'}"]) == 2
    assert "not a reward model" in capsys.readouterr().err and not (tmp_path / "o2").exists()
