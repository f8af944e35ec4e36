"""Stages chained by run-relative paths (the Llama 3 chain: SFT -> rejection sampling -> PPO
-> DPO), packaged recipe names, the run's time estimate, and the eval stage scoring every
policy of the run."""
import json

import pytest

from lmlab.errors import LmlabError
from lmlab.pipeline import (
    RunClock, load_recipe, recipe_path, run_pipeline, run_references, stage_hashes, stage_module, stage_needs,
)
from test_pipeline_recipe import TINY

CHAIN = "stages=[tokenizer, shards, pretrain, world, sft, rejection, ppo, dpo, eval]"


def test_run_relative_paths_are_dependencies():
    stages = ("sft", "reward", "warm", "rejection", "ppo")
    assert run_references({"policy": "rejection/model", "reward": {"paths": ["warm/model", "/abs/x"]},
                           "other": "gold", "rel": "./warm/model", "x": "notastage/model"}, stages) \
        == ["rejection", "warm"]
    recipe, _ = load_recipe(None, [CHAIN, "ppo.policy=rejection/model", "dpo.base=ppo/model"])
    assert stage_needs(stage_module("ppo"), recipe) == ("sft", "world", "rejection")
    assert stage_needs(stage_module("dpo"), recipe) == ("sft", "world", "ppo")
    # The chain is hashed end to end: a rejection setting reaches dpo through ppo.
    other, _ = load_recipe(None, [CHAIN, "ppo.policy=rejection/model", "dpo.base=ppo/model", "rejection.n=4"])
    a, b = stage_hashes(recipe), stage_hashes(other)
    assert a["rejection"] != b["rejection"] and a["ppo"] != b["ppo"] and a["dpo"] != b["dpo"]
    assert a["sft"] == b["sft"]
    # Unchained, dpo starts from sft and a rejection setting leaves it alone.
    plain, _ = load_recipe(None, [CHAIN])
    plain_n4, _ = load_recipe(None, [CHAIN, "rejection.n=4"])
    assert stage_hashes(plain)["dpo"] == stage_hashes(plain_n4)["dpo"]


def test_a_stage_reading_a_later_one_is_refused():
    with pytest.raises(LmlabError, match="'ppo' reads the outputs of 'dpo', listed after it"):
        load_recipe(None, [CHAIN, "ppo.policy=dpo/model"])


def test_packaged_recipes_by_name(tmp_path):
    assert recipe_path("quick").name == "quick.yaml" and recipe_path(None).name == "default.yaml"
    assert recipe_path("llama3-chain").is_file()
    with pytest.raises(LmlabError, match="packaged: .*default.*quick"):
        recipe_path("no-such-recipe")
    mine = tmp_path / "mine.yaml"
    mine.write_text("name: mine\n")
    assert recipe_path(mine) == mine


def test_run_clock_scales_the_measured_rate_to_the_work_left():
    clock = RunClock({"a": 100.0, "b": 0.0, "c": 300.0, "d": 50.0})
    assert clock.remaining() is None and "left" not in clock.status(3.0)
    clock.finished("b", 1.0)  # a stage without a cost teaches nothing about the rate
    assert clock.remaining() is None
    clock.finished("a", 20.0)  # 0.2 s per unit, 350 units left
    assert clock.remaining() == pytest.approx(70.0)
    clock.skipped("d")
    assert clock.remaining() == pytest.approx(60.0)
    assert clock.status(125.0) == " · 2m05s elapsed · about 1m00s left"


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory):
    """The Llama 3 chain on a tiny run; rejection's SFT barely moves (lr 1e-12), so its policy
    is the SFT model to within rounding: win rate 0.5 and KL 0 against it."""
    root = tmp_path_factory.mktemp("chain")
    corpus = root / "corpus.jsonl"  # documents, so that the shards hold a held-out split
    corpus.write_text("".join(json.dumps({"text": f"sort the list {i} then {i + 1} and {i * 7 % 11}: done."}) + "\n"
                              for i in range(200)))
    quiet_train = "{steps: 2, batch_size: 2, progress: false, precision: float32, log_every: 1}"
    sets = [*TINY, f"data.source={corpus}", CHAIN, "eval.prompts=6",
            "rejection={n: 2, max_prompts: 4, max_new_tokens: 6, sft: {train: {steps: 1, batch_size: 2, lr: 1.0e-12, "
            "progress: false, precision: float32}}}",
            "ppo={policy: rejection/model, iterations: 1, rollout: {prompts: 2, group_size: 2, max_new_tokens: 4}, "
            "eval_n: 2, train: {progress: false, precision: float32}}",
            f"dpo={{base: ppo/model, train: {quiet_train}}}"]
    recipe, raw = load_recipe(None, sets)
    lines = []
    run_pipeline(recipe, root / "run", raw=raw, echo=lines.append)
    return root / "run", lines


def test_the_chain_starts_each_stage_from_the_one_before(chain_run):
    run, lines = chain_run
    ppo = json.loads((run / "ppo" / "stage.json").read_text())
    assert ppo["stage"] == "ppo"
    config = json.loads((run / "ppo" / "model" / "config.json").read_text())
    assert config  # the ppo policy was written
    recipe = (run / "recipe.yaml").read_text()
    assert "rejection/model" in recipe and "ppo/model" in recipe
    # Every stage header after the first costed one carries the run's time estimate.
    headers = [line for line in lines if line.startswith("== [")]
    assert all(" elapsed" in h for h in headers)
    assert any("left" in h for h in headers[4:])


def test_eval_scores_every_policy_of_the_run(chain_run):
    from lmlab.data.chat import RoleTokenTemplate
    from lmlab.eval.gold import answer_prompts
    from lmlab.hub import load_model
    from lmlab.tokenizer import Tokenizer
    from lmlab.worlds.evaluate import sort_rewards

    run, _ = chain_run
    report = json.loads((run / "eval" / "world_eval.json").read_text())
    policies = report["policies"]
    assert set(policies) == {"sft", "rejection", "ppo", "dpo"}
    assert report["gold_reward_dense"] == policies["sft"]["gold_reward_dense"]
    assert policies["sft"]["kl_to_sft"] == 0.0 and "win_rate_vs_sft" not in policies["sft"]
    # rejection is the SFT model to within lr 1e-12: every prompt ties, and KL is 0.
    assert policies["rejection"]["win_rate_vs_sft"] == 0.5
    assert abs(policies["rejection"]["kl_to_sft"]) < 1e-4
    # The dpo policy's gold reward, recomputed here from its own greedy answers.
    rows = [json.loads(line) for line in (run / "world" / "eval.jsonl").read_text().splitlines()][:6]
    tok = Tokenizer.load(run / "dpo" / "model")
    answers, reasons = answer_prompts(load_model(run / "dpo" / "model").eval(), tok, [r["prompt"] for r in rows],
                                      template=RoleTokenTemplate(tok), max_new_tokens=8)
    dense = sort_rewards([r["prompt"] for r in rows], answers, reasons)["gold_dense"]
    assert policies["dpo"]["gold_reward_dense"] == pytest.approx(sum(dense) / len(dense))
    ppl = report["pretrain_perplexity"]
    assert ppl["perplexity"] == pytest.approx(2.718281828 ** ppl["loss"]) and ppl["tokens"] > 0


def test_precision_flag_reaches_every_stage():
    import dataclasses

    from lmlab.pipeline import with_precision

    recipe = with_precision(load_recipe(None)[0], "float32")
    found = []

    def walk(v, where):
        if dataclasses.is_dataclass(v):
            for f in dataclasses.fields(v):
                x = getattr(v, f.name)
                if f.name == "precision":
                    found.append((where, x))
                walk(x, f"{where}.{f.name}")

    walk(recipe, "recipe")
    assert len(found) >= 10 and all(p == "float32" for _, p in found), found
    assert {w for w, _ in found} >= {"recipe.train", "recipe.sft.train", "recipe.reward.probe", "recipe.ppo.train",
                                     "recipe.proxy.train", "recipe.dpo.train"}
    with pytest.raises(LmlabError):
        with_precision(recipe, "float8")


def test_report_shows_every_policy_of_the_chain(chain_run):
    from lmlab.report import build_report

    run, _ = chain_run
    html = build_report(run).read_text()
    assert "greedy answers of each policy" in html
    for name in ("rejection", "ppo", "dpo"):
        assert f"<th>{name}</th>" in html
    assert "win rate vs SFT" in html
