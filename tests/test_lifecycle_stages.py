"""The lifecycle stages curate, reward, warm, proxy and export on a tiny run, each checked
against an independent computation (set-based dedup, the gold reward by hand, evaluate_pairs,
a float64 weight average, transformers, the gguf reader), and their bad settings refused."""
import json
import shutil

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.pipeline import MARKER, StageContext, load_recipe, run_pipeline, stage_hashes, stage_module
from test_pipeline_recipe import TINY

LIFECYCLE = None  # the default recipe is the whole lifecycle
BASE_STAGES = "stages=[curate, tokenizer, shards, pretrain, world, sft]"
QUIET = "{steps: 3, batch_size: 4, progress: false, precision: float32, log_every: 1}"
SETS = [
    "curate.quality=null", "world.flip_rate=0.25",
    f"reward={{members: 2, eval_pairs: 30, lrs: [1.0e-3, 3.0e-3], seeds: [5, 6], adapter: {{r: 2}}, "
    f"probe: {QUIET}, train: {QUIET}}}",
    f"proxy={{model: {{preset: nano, n_layers: 2, max_seq_len: 64}}, train: {QUIET}, tune_steps: 2, prompts: 4, "
    "max_new_tokens: 6, alphas: [0.0, 1.0]}",
    "export.gguf_type=q8_0",
]


def quiet(*_):
    pass


def corpus_docs():
    docs = [{"id": f"d{i}", "text": " ".join([f"sort the list {i} then {i + 1} and {i * 7 % 11}: done."] * 3)}
            for i in range(120)]
    return docs + [dict(d, id=f"copy-{d['id']}") for d in docs[:15]]  # exact duplicates under other ids


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """curate -> tokenizer -> shards -> pretrain -> world -> sft, once for the module."""
    root = tmp_path_factory.mktemp("lifecycle")
    corpus = root / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in corpus_docs()) + "\n")
    sets = [*TINY, f"data.source={corpus}", *SETS]
    recipe, raw = load_recipe(None, [*sets, BASE_STAGES])
    run_pipeline(recipe, root / "run", raw=raw, echo=quiet)
    return root / "run", sets


def stage_run(base_run, tmp_path, stage, needs, extra=(), stages=None):
    """Run one stage on a copy of the base run's directories it reads."""
    run, sets = base_run
    for name in needs:
        if not (tmp_path / name).exists():
            shutil.copytree(run / name, tmp_path / name)
    recipe, _ = load_recipe(None, [*sets, *extra, f"stages=[{', '.join(stages or [*needs, stage])}]"])
    stage_module(stage).run(StageContext(stage, tmp_path, recipe, echo=quiet))
    return recipe


# ---- curate ----------------------------------------------------------------------------

def test_curate_removes_duplicates_and_feeds_tokenizer_and_shards(base_run):
    run, _ = base_run
    kept = [json.loads(line) for line in (run / "curate/curated.jsonl").read_text().splitlines()]
    docs = corpus_docs()
    assert len(kept) == len({d["text"] for d in docs}) == 120
    texts = [d["text"] for d in kept]
    assert len(set(texts)) == 120 and set(texts) == {d["text"] for d in docs}  # one of each copy kept
    report = json.loads((run / "curate/curation_report.json").read_text())
    assert report["input"] == 135 and report["kept"] == 120 and sum(report["removed"].values()) == 15
    # The shards hold the curated documents, not the corpus's 135.
    manifest = json.loads((run / "shards/manifest.json").read_text())
    assert sum(s["documents"] for s in manifest["splits"].values()) == 120


def test_curate_is_hashed_into_the_stages_that_read_it(base_run):
    _, sets = base_run
    with_curate, _ = load_recipe(None, [*sets, BASE_STAGES])
    no_dedup, _ = load_recipe(None, [*sets, BASE_STAGES, "curate.dedup=null"])
    without, _ = load_recipe(None, [*sets, "stages=[tokenizer, shards, pretrain, world, sft]"])
    a, b, c = stage_hashes(with_curate), stage_hashes(no_dedup), stage_hashes(without)
    for name in ("curate", "tokenizer", "shards", "pretrain", "sft"):
        assert a[name] != b[name], name
    assert a["world"] == b["world"] == c["world"]
    assert a["tokenizer"] != c["tokenizer"]  # with curation in the run the tokenizer reads another corpus


def test_tokenizer_without_complete_curation_is_refused(base_run, tmp_path):
    _, sets = base_run
    recipe, _ = load_recipe(None, [*sets, BASE_STAGES])
    with pytest.raises(LmlabError, match="'curate'"):
        run_pipeline(recipe, tmp_path / "r", only=("tokenizer",), echo=quiet)


def test_curate_documents_of_the_embedded_corpus():
    from lmlab.data.corpus import embedded_corpus_files
    from lmlab.stages.curate import documents
    from lmlab.stages.common import DataConfig

    docs = documents(DataConfig())
    assert len(docs) == len(embedded_corpus_files()) and len({d["id"] for d in docs}) == len(docs)
    assert all(d["id"].endswith(".rst") and d["text"] for d in docs)


# ---- reward and warm --------------------------------------------------------------------

@pytest.fixture(scope="module")
def rewarded(base_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("rewarded")
    recipe = stage_run(base_run, path, "reward", ("sft", "world"))
    return path, recipe


def gold_split_by_hand(path):
    """(agree, disagree) counts of a preference file under SortWorld's gold reward."""
    from lmlab.worlds.sort import gold_reward, parse_prompt

    agree = disagree = 0
    for line in path.read_text().splitlines():
        r = json.loads(line)
        symbols = parse_prompt(r["prompt"]).symbols
        d = gold_reward(symbols, r["chosen"], True) - gold_reward(symbols, r["rejected"], True)
        agree, disagree = agree + (d > 1e-9), disagree + (d < -1e-9)  # 0.9 vs 0.8999999999999999 is a tie
    return agree, disagree


def test_reward_stage_trains_members_from_one_probe(rewarded, base_run):
    from lmlab.checkpoint import load_state_dict

    path, recipe = rewarded
    report = json.loads((path / "reward/reward_report.json").read_text())
    assert [(m["name"], m["lr"], m["seed"], m["steps"]) for m in report["members"]] == [
        ("member-0", 1e-3, 5, 3), ("member-1", 3e-3, 6, 3)]
    assert report["flip_rate"] == 0.25
    assert set(report["sets"]) == {"train_clean", "train_noisy", "test_id", "test_ood"}
    agree, disagree = gold_split_by_hand(path / "world/preferences_train.jsonl")
    assert report["sets"]["train_clean"] == min(30, agree) and report["sets"]["train_noisy"] == min(30, disagree)
    assert disagree > 0  # a quarter of the labels flipped
    # The probe trained the head only: its trunk is the SFT model's, bit for bit.
    probe = load_state_dict(path / "reward/probe/model/model.safetensors")
    sft = load_state_dict(base_run[0] / "sft/model/model.safetensors")
    trunk = [k for k in probe if k.startswith("transformer.")]
    assert trunk and all(torch.equal(probe[k], sft[k[len("transformer."):]]) for k in trunk)
    assert probe["score.weight"].abs().sum() > 0
    for m in report["members"]:
        assert all(0.0 <= v <= 1.0 for v in m["accuracy"].values())


def test_reward_accuracy_equals_the_training_librarys_evaluate_pairs(rewarded):
    """The report's accuracy (Reward.score on each side) equals evaluate_pairs (BradleyTerry's
    batched metric over encoded pairs), a separate code path, on the same gold-oriented pairs."""
    from lmlab.data.preference import PairEncoder, PreferenceCollator, PreferenceDataset, encode_pairs, pad_id_of
    from lmlab.rewards.io import load_reward_model
    from lmlab.rewards.train import evaluate_pairs
    from lmlab.stages.common import preference_eval_sets
    from lmlab.tokenizer import Tokenizer

    path, recipe = rewarded
    report = json.loads((path / "reward/reward_report.json").read_text())
    sets, _ = preference_eval_sets(path, recipe.world, recipe.reward.eval_pairs)
    model_dir = path / "reward/member-1/model"
    rm, tok = load_reward_model(model_dir), Tokenizer.load(model_dir)
    for name in ("test_id", "train_noisy"):
        data = PreferenceDataset(encode_pairs(sets[name], PairEncoder(tok, "lmlab"), rm.config.max_seq_len, False))
        got = evaluate_pairs(rm, data, PreferenceCollator(pad_id_of(tok), "right"))["accuracy"]
        assert report["members"][1]["accuracy"][name] == pytest.approx(got, abs=1e-6)


def test_warm_stage_averages_the_members_and_compares_ens(rewarded):
    from lmlab.checkpoint import load_state_dict
    from lmlab.rewards.base import ModelReward
    from lmlab.stages.common import preference_eval_sets

    path, recipe = rewarded
    stage_module("warm").run(StageContext("warm", path, recipe, echo=quiet))
    warm = load_state_dict(path / "warm/model/model.safetensors")
    members = [load_state_dict(path / f"reward/member-{k}/model/model.safetensors") for k in range(2)]
    assert set(warm) == set(members[0])
    for k, v in warm.items():
        want = ((members[0][k].double() + members[1][k].double()) / 2).to(v.dtype)
        assert torch.equal(v, want), k
    report = json.loads((path / "warm/warm_report.json").read_text())
    acc = report["accuracy"]
    assert set(acc) == {"best_single", "mean_single", "ens", "warm"}
    # ENS by hand: the mean of the two members' scores, ties counting half.
    sets, _ = preference_eval_sets(path, recipe.world, recipe.reward.eval_pairs)
    rms = [ModelReward.from_dir(path / f"reward/member-{k}/model") for k in range(2)]
    for name, pairs in sets.items():
        prompts = [p.prompt for p in pairs]
        chosen = sum(r.score(prompts, [p.chosen for p in pairs]) for r in rms) / 2
        rejected = sum(r.score(prompts, [p.rejected for p in pairs]) for r in rms) / 2
        by_hand = ((chosen > rejected).float().mean() + 0.5 * (chosen == rejected).float().mean()).item()
        assert acc["ens"][name] == pytest.approx(by_hand, abs=1e-6)
    singles = json.loads((path / "reward/reward_report.json").read_text())["members"]
    best = max(singles, key=lambda m: m["accuracy"]["test_id"])
    assert acc["best_single"]["member"] == best["name"] and acc["best_single"]["test_id"] == best["accuracy"]["test_id"]


def test_warm_needs_two_members_and_matching_weights(rewarded, tmp_path):
    path, _ = rewarded
    shutil.copytree(path / "reward", tmp_path / "reward")
    shutil.copytree(path / "world", tmp_path / "world")
    report = json.loads((tmp_path / "reward/reward_report.json").read_text())
    recipe, _ = load_recipe(None, [*base_sets(), "warm.weights=[1, 2, 3]"])
    with pytest.raises(LmlabError, match="3 entries for 2 members"):
        stage_module("warm").run(StageContext("warm", tmp_path, recipe, echo=quiet))
    report["members"] = report["members"][:1]
    (tmp_path / "reward/reward_report.json").write_text(json.dumps(report))
    with pytest.raises(LmlabError, match="at least 2"):
        stage_module("warm").run(StageContext("warm", tmp_path, recipe, echo=quiet))


def test_baklava_members_start_from_different_sft_checkpoints_and_still_average(base_run, tmp_path):
    """reward.init=baklava: member k's trunk starts from the sft run's step checkpoint (the
    LoRA members leave the embedding frozen, so theirs is still that checkpoint's, bit for
    bit, and the two differ), its head from the shared probe; WARM averages them."""
    from lmlab.checkpoint import load_state_dict

    recipe = stage_run(base_run, tmp_path, "reward", ("sft", "world"), extra=["reward.init=baklava"])
    report = json.loads((tmp_path / "reward/reward_report.json").read_text())
    assert report["init"] == "baklava"
    assert [m["start"] for m in report["members"]] == ["sft/checkpoints/step-2", "sft/checkpoints/step-4"]
    starts = [load_state_dict(tmp_path / f"sft/checkpoints/step-{n}/model.safetensors") for n in (2, 4)]
    members = [load_state_dict(tmp_path / f"reward/member-{k}/model/model.safetensors") for k in range(2)]
    embed = "embed.weight"
    assert not torch.equal(starts[0][embed], starts[1][embed])  # the SFT trained the embedding in between
    for start, member in zip(starts, members):
        assert torch.equal(member["transformer." + embed], start[embed])
    # Both members trained from the probe's head, not a fresh zero one: the probe's head is
    # on the final SFT model's trunk (the shared-init recipe's start).
    probe = load_state_dict(tmp_path / "reward/probe/model/model.safetensors")
    final = load_state_dict(tmp_path / "sft/model/model.safetensors")
    assert torch.equal(probe["transformer." + embed], final[embed]) and probe["score.weight"].abs().sum() > 0
    stage_module("warm").run(StageContext("warm", tmp_path, recipe, echo=quiet))
    warm = load_state_dict(tmp_path / "warm/model/model.safetensors")
    for k, v in warm.items():
        assert torch.equal(v, ((members[0][k].double() + members[1][k].double()) / 2).to(v.dtype)), k
    assert json.loads((tmp_path / "warm/warm_report.json").read_text())["accuracy"]["warm"]


def test_baklava_needs_the_sft_runs_checkpoints(base_run, tmp_path):
    shutil.copytree(base_run[0] / "sft", tmp_path / "sft", ignore=shutil.ignore_patterns("step-2"))
    with pytest.raises(LmlabError, match="checkpoint_every"):
        stage_run(base_run, tmp_path, "reward", ("sft", "world"), extra=["reward.init=baklava"])
    assert not (tmp_path / "reward" / "probe").exists()  # refused before anything trains
    with pytest.raises(LmlabError, match="reward.init"):
        load_recipe(None, [*base_sets(), "reward.init=bakalva"])


def base_sets():
    return [*TINY, *SETS]


# ---- proxy ----------------------------------------------------------------------------

def test_proxy_stage_scores_every_model_and_the_gap(base_run, tmp_path):
    stage_run(base_run, tmp_path, "proxy", ("tokenizer", "shards", "pretrain", "sft", "world"))
    report = json.loads((tmp_path / "proxy/proxy_report.json").read_text())
    assert set(report["scores"]) == {"large_base", "small_base", "small_tuned", "large_tuned"}
    assert report["parameters"]["large"] > report["parameters"]["small"]
    assert (tmp_path / "proxy/large/model/config.json").is_file()
    assert (tmp_path / "proxy/large-tuned/model/config.json").is_file()
    # alpha = 0 is the large base alone: the same greedy answers, the same scores.
    assert report["proxy"]["0.0"] == report["scores"]["large_base"]
    assert report["examples"]["proxy_alpha_0"] == report["examples"]["large_base"]
    base, top = report["scores"]["large_base"]["gold_reward_dense"], report["scores"]["large_tuned"]["gold_reward_dense"]
    assert report["gap"] == pytest.approx(top - base)
    for alpha, closed in report["gap_closed"].items():
        if top - base > 1e-6:
            assert closed == pytest.approx((report["proxy"][alpha]["gold_reward_dense"] - base) / (top - base))
        else:
            assert closed is None


def test_proxy_stage_takes_an_existing_large_base(base_run, tmp_path):
    large = tmp_path / "given"
    shutil.copytree(base_run[0] / "pretrain/model", large)  # the small base stands in: same vocabulary
    stage_run(base_run, tmp_path, "proxy", ("tokenizer", "shards", "pretrain", "sft", "world"),
              extra=[f"proxy.base={large}", "proxy.tune=false"])
    report = json.loads((tmp_path / "proxy/proxy_report.json").read_text())
    assert report["large_base"] == str(large) and not (tmp_path / "proxy/large").exists()
    assert "large_tuned" not in report["scores"] and report["gap"] is None
    assert set(report["gap_closed"].values()) == {None}
    # large == small base: alpha 1 is exactly the expert's distribution.
    assert report["proxy"]["1.0"] == report["scores"]["small_tuned"]


# ---- export -----------------------------------------------------------------------------

def test_export_stage_writes_hf_and_gguf_of_the_last_policy(base_run, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM

    from lmlab.hub import load_model

    stage_run(base_run, tmp_path, "export", ("sft",), stages=["sft", "export"])
    report = json.loads((tmp_path / "export/export_report.json").read_text())
    assert report["source"] == "sft"
    hf_dir, gguf_file = tmp_path / "export/hf", tmp_path / "export/model.gguf"
    assert report["files"]["hf"]["bytes"] == sum(p.stat().st_size for p in hf_dir.rglob("*") if p.is_file())
    assert report["files"]["gguf"]["bytes"] == gguf_file.stat().st_size
    ours = load_model(tmp_path / "sft/model").eval()
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert (ours(ids) - theirs(input_ids=ids).logits).abs().max().item() < 1e-4
    reader = gguf.GGUFReader(gguf_file)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_export_source_choice():
    from lmlab.stages.export import ExportConfig, source_stage

    auto = ExportConfig()
    assert source_stage(auto, ("tokenizer", "sft", "reward", "dpo", "proxy", "export")) == "dpo"
    assert source_stage(auto, ("sft", "export")) == "sft"
    assert source_stage(ExportConfig(source="sft"), ("sft", "dpo")) == "sft"
    with pytest.raises(LmlabError, match="no policy stage"):
        source_stage(auto, ("tokenizer", "pretrain", "export"))
    with pytest.raises(LmlabError, match="not one of this recipe's stages"):
        source_stage(ExportConfig(source="dpo"), ("sft", "export"))


# ---- recipes and bad settings -------------------------------------------------------------

def test_lifecycle_recipe_lists_every_stage_in_order():
    from lmlab.pipeline import STAGE_MODULES

    recipe, _ = load_recipe(LIFECYCLE)
    assert list(recipe.stages) == ["curate", "tokenizer", "shards", "pretrain", "sample", "world", "sft", "reward",
                                   "warm", "rejection", "ppo", "dpo", "proxy", "eval", "export", "report"]
    assert recipe.ppo.reward.paths == ("warm/model",) and recipe.rejection.reward == "warm/model"
    assert set(recipe.stages) <= set(STAGE_MODULES)
    assert recipe.world.flip_rate == 0.25 and recipe.reward.members == 4 and recipe.export.gguf_type == "q8_0"
    quick, _ = load_recipe("quick")
    assert quick.stages == ("tokenizer", "shards", "pretrain", "sample", "world", "sft", "eval", "report")


@pytest.mark.parametrize("override, message", [
    ("world.flip_rate=0.7", "flip_rate must be in"),
    ("reward.members=0", "at least 1"),
    ("reward.method=head", "reward.method"),
    ("reward.lrs=[1.0e-3]", "1 entries for 4 members"),
    ("reward.seeds=[1, 2]", "2 entries for 4 members"),
    ("reward.lrs=[1.0e-3, 0, 1.0e-3, 1.0e-3]", "positive"),
    ("warm.ens_mode=median", "ens_mode"),
    ("proxy.alphas=[]", "alphas is empty"),
    ("proxy.prompts=0", "proxy.prompts"),
    ("export.gguf_type=q4_k", "gguf_type"),
    ("export={hf: false, gguf: false}", "nothing to export"),
    ("curate.dedup.threshhold=0.5", "threshold"),
])
def test_bad_settings_are_refused_when_the_recipe_loads(override, message):
    with pytest.raises(LmlabError, match=message):
        load_recipe(LIFECYCLE, [override])


def test_proxy_model_with_another_vocabulary_is_refused():
    from lmlab.stages.proxy import large_config

    assert large_config("nano", 300, 32).vocab_size == 300
    with pytest.raises(LmlabError, match="vocabulary"):
        large_config({"preset": "nano", "vocab_size": 512}, 300, 32)
    with pytest.raises(LmlabError, match="max_seq_len"):
        large_config({"preset": "nano", "max_seq_len": 16}, 300, 32)


def test_stages_leave_markers_in_a_pipeline_run(base_run):
    run, _ = base_run
    for name in ("curate", "tokenizer", "shards", "pretrain", "world", "sft"):
        assert json.loads((run / name / MARKER).read_text())["stage"] == name


def test_world_preferences_never_have_an_empty_answer(tmp_path):
    """At n=1000 the labeller once paired "" (a one-symbol answer after a drop) with "um",
    which the chat template refuses when a reward model or DPO encodes it; candidates now
    leave empty answers out."""
    from lmlab.worlds.export import export_world

    export_world("sort", tmp_path, seed=0, n=1000)
    for split in ("train", "test_id", "test_ood"):
        path = tmp_path / f"preferences_{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert rows and all(r["chosen"].strip() and r["rejected"].strip() for r in rows)
