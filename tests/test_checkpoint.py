import json

import pytest
import torch

from lmlab import load_model
from lmlab.checkpoint import save_model
from lmlab.config import get_preset
from lmlab.errors import LmlabError
from lmlab.model import build_model


def test_save_load_round_trip(tmp_path):
    model = build_model(get_preset("nano").replace(tie_embeddings=True))
    save_model(model, tmp_path / "ck")
    loaded = load_model(tmp_path / "ck")
    x = torch.randint(0, 512, (1, 6))
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    assert not list((tmp_path / "ck").glob(".*tmp"))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(LmlabError, match="does not exist"):
        load_model(tmp_path / "missing")


def test_mismatched_config_is_refused(tmp_path):
    save_model(build_model(get_preset("nano")), tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    meta["model"]["ffn_hidden"] = 100
    (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(LmlabError, match="different models"):
        load_model(tmp_path / "ck")


def test_checkpoints_record_their_kind_and_hub_opens_each(tmp_path):
    from lmlab.checkpoint import checkpoint_kind
    from lmlab.hub import detect_format
    from lmlab.model.heads import RewardModel

    lm = build_model(get_preset("nano"))
    save_model(lm, tmp_path / "lm")
    rm = RewardModel.from_lm(build_model(get_preset("nano")))
    save_model(rm, tmp_path / "rm")
    assert checkpoint_kind(tmp_path / "lm") == "lm" and checkpoint_kind(tmp_path / "rm") == "reward"
    assert detect_format(tmp_path / "lm") == "lmlab"
    back = load_model(tmp_path / "rm")
    assert isinstance(back, RewardModel)
    ids, mask = torch.randint(0, 512, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    torch.testing.assert_close(back(ids, mask), rm(ids, mask))
    # checkpoints written before kinds existed are language models
    meta = json.loads((tmp_path / "lm" / "config.json").read_text())
    del meta["kind"]
    (tmp_path / "lm" / "config.json").write_text(json.dumps(meta))
    assert checkpoint_kind(tmp_path / "lm") == "lm" and isinstance(load_model(tmp_path / "lm"), type(lm))


def test_adapter_kind_and_step_checkpoints_with_adapters_open_as_one_model(tmp_path, capsys):
    from lmlab.adapters import AdapterConfig, apply_adapters, save_adapter
    from lmlab.cli import main
    from lmlab.tokenizer import SPECIAL_TOKENS, train_tokenizer

    tok = train_tokenizer(["a b c d"] * 10, vocab_size=len(SPECIAL_TOKENS) + 256 + 4)
    base = build_model(get_preset("nano").replace(vocab_size=tok.vocab_size))
    save_model(base, tmp_path / "base", tokenizer=tok)
    apply_adapters(base, AdapterConfig(r=2, targets=("q_proj", "v_proj")))
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.normal_()
    x = torch.randint(0, tok.vocab_size, (1, 6))
    with torch.no_grad():
        expected = base(x)
    save_adapter(base, tmp_path / "adapter", base=tmp_path / "base")
    save_model(base, tmp_path / "step", tokenizer=tok)  # what a LoRA run's step checkpoint holds
    for path in ("adapter", "step"):
        torch.testing.assert_close(load_model(tmp_path / path)(x), expected, atol=1e-5, rtol=1e-5)
    adapted = load_model(tmp_path / "step", merge_adapters=False)
    assert any("lora_A" in n for n, _ in adapted.named_parameters())
    # and `lmlab generate` opens both (the adapter directory carries no tokenizer: --tokenizer)
    assert main(["generate", str(tmp_path / "step"), "--prompt", "a b", "--max-new-tokens", "3"]) == 0
    assert main(["generate", str(tmp_path / "adapter"), "--tokenizer", str(tmp_path / "base"),
                 "--prompt", "a b", "--max-new-tokens", "3"]) == 0
    # moving the whole directory keeps the adapter's relative base path valid
    import shutil
    shutil.move(tmp_path, tmp_path.with_name(tmp_path.name + "-moved"))
    moved = tmp_path.with_name(tmp_path.name + "-moved")
    torch.testing.assert_close(load_model(moved / "adapter")(x), expected, atol=1e-5, rtol=1e-5)


def test_an_adapter_without_its_base_says_what_to_do(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps({"format": "lmlab", "kind": "adapter",
                                                            "base": "../gone"}))
    with pytest.raises(LmlabError, match="adapter merge"):
        load_model(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(LmlabError, match="not a model this version can open"):
        load_model(tmp_path / "b")
