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
