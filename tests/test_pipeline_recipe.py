"""Recipe loading, overrides and the checks made before any training starts."""
import pytest

from lmlab.errors import LmlabError
from lmlab.pipeline import STAGES, load_recipe, model_config_for, run_pipeline, stage, unique_run_dir


def test_default_recipe_loads_and_overrides_apply():
    recipe, raw = load_recipe(None, ["train.lr=1e-3", "model.n_layers=2", "data.seq_len=64"])
    assert recipe.train.lr == 1e-3 and recipe.data.seq_len == 64
    assert recipe.model["n_layers"] == 2 and raw["model"]["n_layers"] == 2
    assert list(recipe.stages) == ["tokenizer", "shards", "pretrain", "sample", "sft"]


@pytest.mark.parametrize("override, closest", [
    ("train.warmup=5", "warmup_steps"), ("data.seqlen=64", "seq_len"), ("model.n_layer=2", "n_layers"),
])
def test_typos_name_the_closest_key(override, closest):
    with pytest.raises(LmlabError, match=closest):
        load_recipe(None, [override])


def test_recipe_file_typo(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ntrian: {lr: 1.0}\n")
    with pytest.raises(LmlabError, match="train"):
        load_recipe(path)


def test_model_takes_the_tokenizer_vocab_and_checks_context():
    assert model_config_for("micro", 3000, 128).vocab_size == 3000
    assert model_config_for({"preset": "micro", "vocab_size": 4000}, 3000, 128).vocab_size == 4000
    with pytest.raises(LmlabError, match="smaller than the tokenizer"):
        model_config_for({"preset": "micro", "vocab_size": 100}, 3000, 128)
    with pytest.raises(LmlabError, match="max_seq_len"):
        model_config_for("micro", 3000, 1024)


def test_stages_are_pluggable_and_unknown_ones_rejected(tmp_path):
    @stage("test-echo")
    def echo(ctx):
        ctx.artifacts["seen"] = ctx.recipe.name

    try:
        recipe, raw = load_recipe(None, ["name=abc"])
        ctx = run_pipeline(recipe, tmp_path / "r", stages=("test-echo",), raw=raw, echo=lambda s: None)
        assert ctx.artifacts["seen"] == "abc" and (tmp_path / "r/recipe.yaml").is_file()
        with pytest.raises(LmlabError, match="unknown pipeline stage"):
            run_pipeline(recipe, tmp_path / "r", stages=("nope",))
    finally:
        STAGES.pop("test-echo")


def test_unique_run_dir_never_reuses(tmp_path):
    assert unique_run_dir(tmp_path, "a") == tmp_path / "a"
    (tmp_path / "a").mkdir()
    (tmp_path / "a-2").mkdir()
    assert unique_run_dir(tmp_path, "a") == tmp_path / "a-3"


def test_pretrain_stage_writes_a_loadable_model_metrics_and_plot(tmp_path):
    # The stage with in-memory artifacts (tokenizer/shards stages are tested with their modules).
    import json

    import torch

    from lmlab.checkpoint import load_model
    from lmlab.pipeline import Context

    class Tok:
        vocab_size = 40

        def save(self, path):
            open(path, "w").write("{}")

    class Seqs(list):
        seq_len = 16

    g = torch.Generator().manual_seed(0)
    data = Seqs(torch.randint(0, 40, (12, 17), generator=g))
    recipe, _ = load_recipe(None, ["model={preset: nano, max_seq_len: 16, n_layers: 1}",
                                    "train={steps: 3, batch_size: 4, log_every: 1, progress: false}"])
    ctx = Context(tmp_path, recipe, echo=lambda s: None,
                  artifacts={"tokenizer": Tok(), "train_data": data, "val_data": Seqs(data[:4])})
    STAGES["pretrain"](ctx)
    model = load_model(tmp_path / "model")
    assert model.config.vocab_size == 40 and model.config.n_layers == 1
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == [1, 2, 3]
    assert any("val_loss" in l for l in lines)
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "checkpoints/step-3/tokenizer.json").is_file()


def test_rerun_without_resume_is_refused_before_any_stage(tmp_path):
    (tmp_path / "checkpoints/step-1").mkdir(parents=True)
    (tmp_path / "checkpoints/step-1/trainer.json").write_text("{}")
    (tmp_path / "checkpoints/step-1/config.json").write_text("{}")
    recipe, _ = load_recipe(None)
    with pytest.raises(LmlabError, match="--resume"):
        run_pipeline(recipe, tmp_path, echo=lambda s: None)
    assert not (tmp_path / "tokenizer.json").exists()


def test_sft_stage_tunes_on_the_world_and_scores_with_the_gold_reward(tmp_path):
    import json

    from lmlab.config import get_preset
    from lmlab.model import build_model
    from lmlab.pipeline import Context
    from lmlab.tokenizer import train_tokenizer
    from lmlab.worlds.sort import sample_tasks

    tok = train_tokenizer([t.prompt + " " + t.ideal for t in sample_tasks(200, seed=1)], vocab_size=300)
    model = build_model(get_preset("nano").replace(vocab_size=tok.vocab_size, max_seq_len=64))
    recipe, _ = load_recipe(None, ["data.seq_len=64", "sft.n=40", "sft.eval_prompts=4",
                                    "sft.train={steps: 2, batch_size: 4, progress: false}"])
    ctx = Context(tmp_path, recipe, echo=lambda s: None, artifacts={"tokenizer": tok, "model": model})
    STAGES["sft"](ctx)
    summary = json.loads((tmp_path / "sft" / "world_eval.json").read_text())
    assert summary["generated"] == 4 and summary["steps"] == 2
    # the gold reward of a perfect answer is 1 (docs/worlds.md); these are bounded scores
    assert -10 < summary["gold_reward_dense"] <= 1 and 0 <= summary["gold_reward_sparse"] <= 1
    assert (tmp_path / "sft" / "adapter" / "adapter.safetensors").is_file()
    assert (tmp_path / "sft" / "model" / "config.json").is_file()
