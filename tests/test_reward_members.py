"""WARM's member starts (lmlab.rewards.members): Baklava's choice of SFT checkpoints by hand,
and a member's initial model = that checkpoint's trunk + the shared probe's head, exactly."""
from __future__ import annotations

import pytest
import torch

from lmlab.checkpoint import save_model
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.model.heads import RewardModel
from lmlab.model.transformer import build_model
from lmlab.rewards import save_reward_model
from lmlab.rewards.members import baklava_starts, sft_checkpoints, spread
from lmlab.rewards.train import initial_reward_model

CFG = ModelConfig(name="t", vocab_size=40, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=32,
                  max_seq_len=16)


def test_spread_by_hand():
    assert spread(8, 6) == [0, 1, 3, 4, 6, 7]  # 0, 1.4, 2.8, 4.2, 5.6, 7 rounded
    assert spread(4, 4) == [0, 1, 2, 3]
    assert spread(4, 6) == [0, 1, 1, 2, 2, 3]  # 0, .6, 1.2, 1.8, 2.4, 3: more members than checkpoints
    assert spread(5, 1) == [4]  # one member: the final checkpoint
    with pytest.raises(LmlabError):
        spread(0, 2)


def lm_checkpoint(path, seed):
    torch.manual_seed(seed)
    save_model(build_model(CFG), path)
    return path


def test_checkpoints_are_found_by_step_complete_ones_only(tmp_path):
    root = tmp_path / "checkpoints"
    for n in (10, 9, 100):
        lm_checkpoint(root / f"step-{n}", n)
    (root / "step-200").mkdir()  # no config.json: not complete
    (root / ".tmp-step-300").mkdir()
    (root / "latest").write_text("step-100")
    assert [p.name for p in sft_checkpoints(root)] == ["step-9", "step-10", "step-100"]  # numeric order
    assert [p.name for p in baklava_starts(root, 2)] == ["step-9", "step-100"]
    for keep in ("step-9", "step-10"):
        (root / keep / "config.json").unlink()
    with pytest.raises(LmlabError, match="keep_checkpoints: 0"):
        baklava_starts(root, 2)


def test_member_start_is_the_checkpoints_trunk_with_the_probes_head(tmp_path):
    trunk_dir = lm_checkpoint(tmp_path / "step-5", 1)
    torch.manual_seed(2)
    probe = RewardModel(CFG)
    torch.nn.init.normal_(probe.score.weight)
    save_reward_model(probe, tmp_path / "probe")
    start = initial_reward_model(trunk_dir, head_from=tmp_path / "probe")
    torch.manual_seed(1)
    lm = build_model(CFG).state_dict()
    got = start.state_dict()
    trunk = [k for k in got if k.startswith("transformer.")]
    assert len(trunk) == len([k for k in lm if "lm_head" not in k])
    assert all(torch.equal(got[k], lm[k[len("transformer."):]]) for k in trunk)
    assert torch.equal(got["score.weight"], probe.score.weight)
    assert not torch.equal(got["transformer.embed.weight"], probe.state_dict()["transformer.embed.weight"])
    # Without head_from the head starts at zero (every pair at loss ln 2).
    assert torch.count_nonzero(initial_reward_model(trunk_dir).score.weight) == 0


def test_head_from_refusals(tmp_path):
    wide = CFG.replace(d_model=32, ffn_hidden=64)
    torch.manual_seed(0)
    save_model(build_model(wide), tmp_path / "wide")
    save_reward_model(RewardModel(CFG), tmp_path / "probe")
    with pytest.raises(LmlabError, match="model.d_model"):
        initial_reward_model(tmp_path / "wide", head_from=tmp_path / "probe")
    with pytest.raises(LmlabError, match="already a reward model"):
        initial_reward_model(tmp_path / "probe", head_from=tmp_path / "probe")
