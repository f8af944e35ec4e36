"""Recipes, the stage runner (markers, --resume/--only/--from/--skip) and the stages end to
end on a tiny run; the checks made before any stage runs."""
import json

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.pipeline import MARKER, load_recipe, run_pipeline, stage_hashes, unique_run_dir
from lmlab.stages.pretrain import model_config_for

# The short run's stages (recipes/quick.yaml): the default recipe runs the whole lifecycle.
QUICK_STAGES = "stages=[tokenizer, shards, pretrain, sample, world, sft, eval, report]"
TINY = [
    QUICK_STAGES, "data.vocab_size=300", "data.seq_len=32", "data.val_fraction=0.1",
    "model={preset: nano, n_layers: 1, max_seq_len: 64}",
    "train={steps: 4, batch_size: 4, log_every: 1, progress: false, precision: float32, checkpoint_every: 2}",
    "sample.max_new_tokens=4", "world.n=40", "eval.prompts=4", "eval.max_new_tokens=8",
    "sft.train={steps: 4, batch_size: 4, progress: false, precision: float32, checkpoint_every: 2}",
    "sft.data.seq_len=64",
]


@pytest.fixture
def tiny(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"sort the list {i} then {i + 1} and {i * 7 % 11}: done." for i in range(200)))
    return [*TINY, f"data.source={corpus}"]


def quiet(*_):
    pass


def test_default_recipe_loads_and_overrides_apply():
    recipe, raw = load_recipe(None, ["train.lr=1e-3", "model.n_layers=2", "data.seq_len=64"])
    assert recipe.train.lr == 1e-3 and recipe.data.seq_len == 64
    assert recipe.model["n_layers"] == 2 and raw["model"]["n_layers"] == 2
    assert recipe.name == "default" and {"reward", "warm", "ppo", "dpo", "proxy", "export", "report"} <= set(recipe.stages)
    # The default follows the hardware; the chat tokens' rows train in the sft stage.
    assert recipe.train.precision == "auto" and recipe.sft.train.precision == "auto"
    assert recipe.sft.adapter.trainable == ("embed", "lm_head")


@pytest.mark.parametrize("override, closest", [
    ("train.warmup=5", "warmup_steps"), ("data.seqlen=64", "seq_len"), ("model.n_layer=2", "n_layers"),
    ("sft.methd=lora", "method"), ("train.precision=bf17", "precision"),
])
def test_typos_name_the_closest_key(override, closest):
    with pytest.raises(LmlabError, match=closest):
        load_recipe(None, [override])


def test_recipe_file_typo_and_unknown_stage(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ntrian: {lr: 1.0}\n")
    with pytest.raises(LmlabError, match="train"):
        load_recipe(path)
    with pytest.raises(LmlabError, match="unknown pipeline stage"):
        load_recipe(None, ["stages=[tokenizer, nope]"])


def test_model_takes_the_tokenizer_vocab_and_checks_context():
    assert model_config_for("micro", 3000, 128).vocab_size == 3000
    assert model_config_for({"preset": "micro", "vocab_size": 4000}, 3000, 128).vocab_size == 4000
    with pytest.raises(LmlabError, match="smaller than the tokenizer"):
        model_config_for({"preset": "micro", "vocab_size": 100}, 3000, 128)
    with pytest.raises(LmlabError, match="max_seq_len"):
        model_config_for("micro", 3000, 1024)


def test_unique_run_dir_never_reuses(tmp_path):
    assert unique_run_dir(tmp_path, "a") == tmp_path / "a"
    (tmp_path / "a").mkdir()
    (tmp_path / "a-2").mkdir()
    assert unique_run_dir(tmp_path, "a") == tmp_path / "a-3"


def test_hashes_follow_settings_and_upstream():
    base, _ = load_recipe(None)
    changed, _ = load_recipe(None, ["train.lr=1e-4"])
    quieter, _ = load_recipe(None, ["train.log_every=50", "train.progress=false"])
    a, b, c = stage_hashes(base), stage_hashes(changed), stage_hashes(quieter)
    assert a["tokenizer"] == b["tokenizer"] and a["world"] == b["world"]
    # pretrain changed, and so did every stage downstream of it; reporting settings are not hashed
    assert all(a[s] != b[s] for s in ("pretrain", "sample", "sft", "eval"))
    assert a == c


def test_tiny_run_end_to_end_then_resume_skip_only(tmp_path, tiny):
    from lmlab.hub import load_model

    recipe, raw = load_recipe(None, tiny)
    run = tmp_path / "run"
    result = run_pipeline(recipe, run, raw=raw, echo=quiet)
    assert result.ran == list(recipe.stages)
    for name in recipe.stages:
        assert json.loads((run / name / MARKER).read_text())["stage"] == name
    assert (run / "tokenizer/tokenizer.json").is_file() and (run / "shards/manifest.json").is_file()
    records = [json.loads(line) for line in (run / "pretrain/metrics.jsonl").read_text().splitlines()]
    assert records[0]["precision"] == "float32"  # the run log names the precision
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert (run / "pretrain/loss.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((run / "eval/world_eval.json").read_text())
    assert summary["generated"] == 4 and summary["steps"] == 4 and summary["precision"] == "float32"
    assert 0 <= summary["gold_reward_sparse"] <= 1

    # The adapter alone opens as base + adapter and equals the merged model; so does a LoRA
    # step checkpoint (saved with its adapters still injected).
    x = torch.randint(0, 300, (1, 8))
    merged = load_model(run / "sft/model")
    for other in (run / "sft/adapter", run / "sft/checkpoints/step-4"):
        torch.testing.assert_close(load_model(other)(x), merged(x), atol=1e-5, rtol=1e-5)
    assert load_model(run / "sft/checkpoints/step-2").config == merged.config

    # --resume with nothing changed skips everything but the report (rebuilt every run).
    assert (run / "report.html").is_file()
    again = run_pipeline(recipe, run, resume=True, raw=raw, echo=quiet)
    assert again.ran == ["report"] and again.skipped == list(recipe.stages)[:-1]
    # A changed sample setting reruns sample alone.
    changed, raw2 = load_recipe(None, [*tiny, "sample.temperature=0.5"])
    assert run_pipeline(changed, run, resume=True, raw=raw2, echo=quiet).ran == ["sample", "report"]
    # --only reruns the named stage, --skip leaves one out.
    assert run_pipeline(recipe, run, only=("eval",), echo=quiet).ran == ["eval"]
    assert run_pipeline(recipe, run, start="sft", skip=("eval",), echo=quiet).ran == ["sft", "report"]
    # Without --resume an existing run is refused before anything is written.
    before = (run / "eval/world_eval.json").read_bytes()
    with pytest.raises(LmlabError, match="--resume"):
        run_pipeline(recipe, run, echo=quiet)
    assert (run / "eval/world_eval.json").read_bytes() == before


def test_stage_needing_an_incomplete_one_is_refused(tmp_path, tiny):
    recipe, _ = load_recipe(None, tiny)
    with pytest.raises(LmlabError, match="'tokenizer'.*not complete"):
        run_pipeline(recipe, tmp_path / "r", only=("sample",), echo=quiet)
    assert not (tmp_path / "r").exists()


def test_a_directory_of_other_files_is_never_used(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    recipe, _ = load_recipe(None)
    for kwargs in ({}, {"only": ("tokenizer",)}):
        with pytest.raises(LmlabError, match="not an lmlab run"):
            run_pipeline(recipe, tmp_path, echo=quiet, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_failed_stage_keeps_finished_ones_and_resume_continues(tmp_path, tiny, monkeypatch):
    import lmlab.stages.world as world

    recipe, raw = load_recipe(None, tiny)
    run = tmp_path / "run"

    def broken(ctx):
        raise LmlabError("the world stage failed on purpose")

    real = world.run
    monkeypatch.setattr(world, "run", broken)
    lines = []
    with pytest.raises(LmlabError, match="stage 'world': .*on purpose"):
        run_pipeline(recipe, run, raw=raw, echo=lines.append)
    assert "stage 'world' failed" in lines[-1] and "--resume" in lines[-1]
    done = {p.parent.name for p in run.glob(f"*/{MARKER}")}
    assert done == {"tokenizer", "shards", "pretrain", "sample"}
    monkeypatch.setattr(world, "run", real)
    result = run_pipeline(recipe, run, resume=True, raw=raw, echo=quiet)
    assert result.skipped == ["tokenizer", "shards", "pretrain", "sample"]
    assert result.ran == ["world", "sft", "eval", "report"]
