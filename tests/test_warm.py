"""WARM: streamed weight averaging of reward models, checked against averages computed
here in float64, against prediction ensembling (ENS) where the two must agree, and on
every refusal (non-reward member, different configs, tensor names, shapes, dtypes)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmlab.checkpoint import save_model
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.merge import normalized_weights, warm_average
from lmlab.model.heads import RewardModel
from lmlab.model.transformer import build_model
from lmlab.rewards import EnsembleReward, ModelReward, load_reward_model, save_reward_model

from chartok import CharTokenizer

TOK = CharTokenizer()
CFG = ModelConfig(name="t", vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=4,
                  n_kv_heads=2, ffn_hidden=64, max_seq_len=32)


def member(path, seed, trunk_seed=None, cfg=CFG):
    """A reward checkpoint: trunk from `trunk_seed` (default `seed`), head from `seed`."""
    torch.manual_seed(seed if trunk_seed is None else trunk_seed)
    rm = RewardModel(cfg)
    torch.manual_seed(1000 + seed)
    torch.nn.init.normal_(rm.score.weight)
    save_reward_model(rm, path, extra={"reward": {"template": "lmlab"}})
    return rm


def weights_of(path):
    return load_file(str(path / "model.safetensors"))


def test_normalised_weights():
    assert normalized_weights(None, 4) == [0.25] * 4
    assert normalized_weights([1, 3], 2) == [0.25, 0.75]
    for bad in ([1, -1], [0, 0], [1, float("nan")]):
        with pytest.raises(LmlabError, match="non-negative"):
            normalized_weights(bad, 2)
    with pytest.raises(LmlabError, match="one weight per member"):
        normalized_weights([1], 2)


def test_averaging_identical_members_is_the_identity(tmp_path):
    member(tmp_path / "a", 0)
    for name in "bc":
        (tmp_path / name).mkdir()
        for f in ("model.safetensors", "config.json"):
            (tmp_path / name / f).write_bytes((tmp_path / "a" / f).read_bytes())
    out = warm_average([tmp_path / n for n in "abc"], tmp_path / "warm")
    a, w = weights_of(tmp_path / "a"), weights_of(out)
    assert set(a) == set(w) and all(torch.equal(a[k], w[k]) for k in a)
    meta = json.loads((out / "config.json").read_text())
    assert meta["kind"] == "reward" and meta["warm"]["weights"] == pytest.approx([1 / 3] * 3)
    assert meta["reward"] == {"template": "lmlab"}
    assert isinstance(load_reward_model(out), RewardModel)


def test_average_equals_float64_reference_and_is_order_invariant(tmp_path):
    dirs = [tmp_path / f"m{i}" for i in range(3)]
    for i, d in enumerate(dirs):
        member(d, i)
    w = [1.0, 2.0, 5.0]
    out = warm_average(dirs, tmp_path / "w1", weights=w)
    out2 = warm_average(dirs[::-1], tmp_path / "w2", weights=w[::-1])
    got, got2 = weights_of(out), weights_of(out2)
    states = [weights_of(d) for d in dirs]
    for k in got:
        ref = sum(s[k].double() * (wi / 8.0) for s, wi in zip(states, w)).float()
        assert torch.equal(got[k], ref), k
        assert torch.equal(got[k], got2[k]), k
    assert not torch.equal(got["score.weight"], states[0]["score.weight"])


def test_warm_equals_ens_for_a_linear_head_on_frozen_features(tmp_path):
    # Identical trunks, different heads: the score is linear in the head, so the averaged
    # head's score is the mean of the members' scores.
    dirs = [tmp_path / f"m{i}" for i in range(4)]
    rms = [member(d, i, trunk_seed=7) for i, d in enumerate(dirs)]
    warm = ModelReward(load_reward_model(warm_average(dirs, tmp_path / "warm")), TOK)
    ens = EnsembleReward([ModelReward(rm, TOK) for rm in rms])
    prompts, comps = ["ab", "abc", "x", "long prompt"], ["c", "de", "yz", "w"]
    w, e = warm.score(prompts, comps), ens.score(prompts, comps)
    assert torch.allclose(w, e, atol=1e-5, rtol=1e-5), (w, e)
    assert not torch.allclose(e, ModelReward(rms[0], TOK).score(prompts, comps), atol=1e-2)


def test_different_trunks_do_not_give_ens(tmp_path):
    dirs = [tmp_path / f"m{i}" for i in range(2)]
    rms = [member(d, i) for i, d in enumerate(dirs)]
    warm = ModelReward(load_reward_model(warm_average(dirs, tmp_path / "warm")), TOK)
    ens = EnsembleReward([ModelReward(rm, TOK) for rm in rms])
    p, c = ["ab", "xyz"], ["c", "d"]
    assert not torch.allclose(warm.score(p, c), ens.score(p, c), atol=1e-3)


def tamper(path, fn):
    state = weights_of(path)
    fn(state)
    save_file(state, str(path / "model.safetensors"))


@pytest.mark.parametrize("case, match", [
    ("config", r"its config \(model\.d_model\)"),
    ("dtype", r"tensor 'transformer\.layers\.1\.mlp\.up_proj\.weight' is BF16"),
    ("shape", r"tensor 'score\.weight' is F32 \[1, 16\]"),
    ("missing", r"has no tensor 'transformer\.norm\.weight'"),
    ("extra", r"has tensor 'transformer\.extra\.weight'"),
    ("lm", "is a language model checkpoint, not a reward model"),
    ("template", r"its config \(reward\.template\)"),
])
def test_mismatched_members_are_refused_naming_the_difference(tmp_path, case, match):
    a, b = tmp_path / "a", tmp_path / "b"
    member(a, 0)
    if case == "config":
        member(b, 1, cfg=CFG.replace(d_model=48, ffn_hidden=64))
    elif case == "lm":
        save_model(build_model(CFG), b)
    else:
        member(b, 1)
    if case == "dtype":
        tamper(b, lambda s: s.update({"transformer.layers.1.mlp.up_proj.weight":
                                      s["transformer.layers.1.mlp.up_proj.weight"].bfloat16()}))
    elif case == "shape":
        tamper(b, lambda s: s.update({"score.weight": torch.zeros(1, 16)}))
    elif case == "missing":
        tamper(b, lambda s: s.pop("transformer.norm.weight"))
    elif case == "extra":
        tamper(b, lambda s: s.update({"transformer.extra.weight": torch.zeros(2)}))
    elif case == "template":
        meta = json.loads((b / "config.json").read_text())
        meta["reward"]["template"] = "none"
        (b / "config.json").write_text(json.dumps(meta))
    with pytest.raises(LmlabError, match=match):
        warm_average([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_refusals_before_any_write(tmp_path):
    member(tmp_path / "a", 0)
    with pytest.raises(LmlabError, match="at least 2"):
        warm_average([tmp_path / "a"], tmp_path / "out")
    with pytest.raises(LmlabError, match="not found"):
        warm_average([tmp_path / "a", tmp_path / "nope"], tmp_path / "out")
    member(tmp_path / "b", 1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(LmlabError, match="not an empty directory"):
        warm_average([tmp_path / "a", tmp_path / "b"], tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert not (tmp_path / "out").exists()


def test_average_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    """Only the lazy reader is used (never a whole-file load), and each member's tensor is
    read once, in turn, before the next tensor's copies."""
    import lmlab.merge as merge

    dirs = [tmp_path / f"m{i}" for i in range(3)]
    for i, d in enumerate(dirs):
        member(d, i)
    monkeypatch.setattr("safetensors.torch.load_file", lambda *a, **k: pytest.fail("whole-file load"))
    reads = []
    real = merge.average_tensor

    def spy(handles, name, weights):
        reads.append(name)
        return real(handles, name, weights)

    monkeypatch.setattr(merge, "average_tensor", spy)
    warm_average(dirs, tmp_path / "warm")
    assert len(reads) == len(set(reads)) == len(RewardModel(CFG).state_dict())
