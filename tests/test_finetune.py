"""`finetune` end to end on a tiny model and a toy chat task: report, adapter, merged export."""
from __future__ import annotations

import json
import random

import pytest
import torch

from lmlab.hub import load_model
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.model.transformer import build_model

from lmlab.adapters import load_adapter
from lmlab.train.finetune import FinetuneConfig, finetune

from chartok import CharTokenizer

TOK = CharTokenizer()
CFG = ModelConfig(name="t", vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=4,
                  n_kv_heads=2, ffn_hidden=64, max_seq_len=64)


def write_task(path, n, seed):
    """Reverse three letters: a task a tiny model learns in a few dozen steps."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            s = "".join(rng.choice("abcd") for _ in range(3))
            f.write(json.dumps({"prompt": s, "response": s[::-1]}) + "\n")


def recipe(tmp_path, method, steps=30):
    write_task(tmp_path / "train.jsonl", 64, 0)
    write_task(tmp_path / "val.jsonl", 16, 1)
    return FinetuneConfig.from_dict({
        "method": method,
        "data": {"train": str(tmp_path / "train.jsonl"), "val": str(tmp_path / "val.jsonl"), "seq_len": 64},
        "adapter": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "up_proj", "down_proj"]},
        "train": {"steps": steps, "batch_size": 4, "lr": 1e-2, "progress": False, "log_every": 5,
                  "warmup_steps": 0},
    })


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_finetune_writes_report_adapter_and_merged_model(tmp_path, method):
    model = build_model(CFG)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lines = []
    result = finetune(model, TOK, recipe(tmp_path, method), tmp_path / "run", log=lines.append)
    assert any("trainable" in line for line in lines) and any("memory estimate" in line for line in lines)
    assert 0 < result.report.trainable_percent < 50
    assert result.train.losses[-1] < result.train.losses[0]
    report = json.loads((tmp_path / "run" / "finetune_report.json").read_text())
    assert report["trainable"] == result.report.trainable and report["val_loss"] == result.val_loss
    # run/model is a plain merged model; base + saved adapter reproduces it.
    merged = load_model(tmp_path / "run" / "model")
    again = build_model(CFG)
    again.load_state_dict(base)
    load_adapter(again, tmp_path / "run" / "adapter")
    idx = torch.randint(0, CFG.vocab_size, (2, 10))
    torch.testing.assert_close(merged(idx), again(idx), atol=1e-5, rtol=1e-5)
    # Only adapter weights moved: the merged model differs from the base only in targets.
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base[k])}
    assert changed and all(k.split(".")[-2] in ("q_proj", "v_proj", "up_proj", "down_proj") for k in changed)


def test_lora_finetune_of_a_moe_adapts_the_experts(tmp_path):
    """The default MLP targets reach a MoE block's stacked experts; the SFT objective adds
    the router's auxiliary losses and logs them."""
    from dataclasses import replace

    from lmlab.adapters import LoRAExperts

    model = build_model(replace(CFG, ffn_hidden=32, n_experts=4, top_k=2, moe_aux_loss_weight=0.01))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    cfg = recipe(tmp_path, "lora", steps=4)
    cfg = replace(cfg, train=replace(cfg.train, eval_every=2))
    finetune(model, TOK, cfg, tmp_path / "run", log=seen.append)
    assert any("adapted modules: 8" in line for line in seen)  # q, v, up, down in 2 layers
    merged = load_model(tmp_path / "run" / "model")
    assert not torch.equal(merged.state_dict()["layers.0.mlp.down_proj.weight"], base["layers.0.mlp.down_proj.weight"])
    assert torch.equal(merged.state_dict()["layers.0.mlp.router.weight"], base["layers.0.mlp.router.weight"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("moe_aux_loss" in m for m in metrics)
    assert any("val_loss" in m for m in metrics)  # periodic validation on the held-out chat rows
    again = build_model(merged.config)
    again.load_state_dict(base)
    load_adapter(again, tmp_path / "run" / "adapter")
    assert isinstance(again.layers[1].mlp.up_proj, LoRAExperts)


def test_full_finetune_trains_everything(tmp_path):
    model = build_model(CFG)
    result = finetune(model, TOK, recipe(tmp_path, "full", steps=5), tmp_path / "run", log=lambda s: None)
    assert result.report.trainable == result.report.total
    assert not (tmp_path / "run" / "adapter").exists()
    load_model(tmp_path / "run" / "model")


def test_recipe_errors():
    with pytest.raises(LmlabError, match="method"):
        FinetuneConfig.from_dict({"method": "qlora", "data": {"train": "x"}})
    with pytest.raises(LmlabError, match="data.train is required"):
        finetune(build_model(CFG), TOK, FinetuneConfig.from_dict({"method": "lora"}), "unused")
    with pytest.raises(LmlabError, match="did you mean 'adapter'"):
        FinetuneConfig.from_dict({"adaptor": {}, "data": {"train": "x"}})


def test_cli_finetune_from_recipe(tmp_path):
    tokenizer_mod = pytest.importorskip("lmlab.tokenizer")  # the data helper's tokenizer
    from lmlab.checkpoint import save_model
    from lmlab.cli import main

    write_task(tmp_path / "train.jsonl", 32, 0)
    texts = [json.loads(line)["prompt"] for line in open(tmp_path / "train.jsonl")] * 4
    tok = tokenizer_mod.train_tokenizer(texts, vocab_size=len(tokenizer_mod.SPECIAL_TOKENS) + 256 + 16)
    cfg = CFG.replace(vocab_size=tok.vocab_size)
    save_model(build_model(cfg), tmp_path / "base", tokenizer=tok)
    (tmp_path / "recipe.yaml").write_text(
        f"base: {tmp_path / 'base'}\nout: {tmp_path / 'run'}\nmethod: lora\n"
        f"data: {{train: {tmp_path / 'train.jsonl'}, seq_len: 32}}\n"
        "train: {steps: 3, batch_size: 2, progress: false}\n")
    assert main(["finetune", "--config", str(tmp_path / "recipe.yaml"), "--method", "dora",
                 "--set", "adapter.r=2"]) == 0
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["method"] == "dora" and saved["r"] == 2
    assert main(["finetune", "--config", str(tmp_path / "recipe.yaml"), "--set", "adapter.rank=2"]) == 2


def test_compare_methods_tabulates_each_method(tmp_path):
    from lmlab.train.finetune import compare_methods
    from dataclasses import replace

    base = build_model(CFG)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = replace(recipe(tmp_path, "lora", steps=3), full_lr=1e-3)
    rows = compare_methods(base, TOK, cfg, tmp_path / "cmp", log=lambda s: None)
    assert [r["method"] for r in rows] == ["full", "lora", "dora"]
    assert rows[0]["lr"] == 1e-3 and rows[1]["lr"] == 1e-2
    total = sum(p.numel() for p in base.parameters())
    assert rows[0]["trainable"] == total
    # DoRA = LoRA + one magnitude per output row of each adapted module.
    mag = 2 * (CFG.d_model + CFG.n_kv_heads * CFG.dim_per_head + CFG.ffn_hidden + CFG.d_model)
    assert rows[2]["trainable"] == rows[1]["trainable"] + mag
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # base untouched
    assert "| dora |" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_val_fraction_holds_out_the_last_records(tmp_path):
    from lmlab.train.finetune import ChatDataConfig, split_conversations

    write_task(tmp_path / "train.jsonl", 20, 0)
    train_convs, val_convs = split_conversations(ChatDataConfig(train=str(tmp_path / "train.jsonl"), val_fraction=0.25))
    assert len(train_convs) == 15 and len(val_convs) == 5
    assert val_convs[0].source.endswith("train.jsonl:16")
    with pytest.raises(LmlabError, match="val_fraction"):
        split_conversations(ChatDataConfig(train=str(tmp_path / "train.jsonl"), val_fraction=0.01))


def test_packaged_finetune_recipe_parses():
    from pathlib import Path

    from lmlab.config import load_yaml

    path = Path(__file__).resolve().parents[1] / "src" / "lmlab" / "recipes" / "finetune-sort.yaml"
    cfg = FinetuneConfig.from_dict(load_yaml(path))
    assert cfg.adapter.r == 8 and cfg.data.val_fraction == 0.1
