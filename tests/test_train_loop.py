"""The training loop: schedules, exact accumulation, exact resume, errors, atomic checkpoints."""
import json
import math
import pytest
import torch

from lmlab.hub import load_model
from lmlab.config import get_preset
from lmlab.errors import LmlabError
from lmlab.model.transformer import build_model
from lmlab.train.config import TrainConfig, apply_overrides
from lmlab.train.data import ShuffledBatches
from lmlab.train.loop import train
from lmlab.train.objectives.lm import IGNORE_INDEX, LanguageModeling
from lmlab.train.schedule import lr_factor
from lmlab.train.state import latest_checkpoint

CFG = get_preset("nano").replace(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                 ffn_hidden=64, max_seq_len=32)


def tokens(n=24, seq=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [t for t in torch.randint(0, CFG.vocab_size, (n, seq + 1), generator=g)]


def fresh(seed=0):
    torch.manual_seed(seed)
    return build_model(CFG)


def quiet(**kw):
    # float32 unless asked: these tests check the loop's arithmetic exactly, whatever the hardware.
    return TrainConfig(**{"progress": False, "log_every": 1, "lr": 3e-3, "precision": "float32", **kw})


# ---- schedules against hand-computed values -------------------------------------------
def test_warmup_then_cosine():
    # total 10, warmup 2: steps 0,1 -> 1/2, 2/2; cosine over steps 2..9 (span 7) to 0.1
    assert lr_factor(0, 10, 2, "cosine", 0.1) == pytest.approx(0.5)
    assert lr_factor(1, 10, 2, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(2, 10, 2, "cosine", 0.1) == pytest.approx(1.0)
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 7))  # step 5
    assert lr_factor(5, 10, 2, "cosine", 0.1) == pytest.approx(mid)
    assert lr_factor(9, 10, 2, "cosine", 0.1) == pytest.approx(0.1)


def test_wsd():
    # total 10, decay_fraction 0.2 -> steps 8, 9 decay linearly to min 0.0
    f = [lr_factor(s, 10, 1, "wsd", 0.0, 0.2) for s in range(10)]
    assert f == pytest.approx([1, 1, 1, 1, 1, 1, 1, 1, 0.5, 0.0])
    assert lr_factor(0, 10, 4, "wsd", 0.1, 0.2) == pytest.approx(0.25)
    assert lr_factor(9, 10, 0, "constant") == 1.0


# ---- accumulation equals one big batch --------------------------------------------------
def test_accumulation_4x2_equals_batch_8(tmp_path):
    data = tokens()
    a, b = fresh(), fresh()
    ra = train(a, LanguageModeling(), data, quiet(steps=3, batch_size=8), tmp_path / "a")
    rb = train(b, LanguageModeling(), data, quiet(steps=3, batch_size=8, micro_batch_size=2),
               tmp_path / "b")
    assert ra.losses == pytest.approx(rb.losses, abs=1e-5)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=n)


def test_accumulation_weights_by_target_tokens(tmp_path):
    # Micro-batches with different numbers of counted targets: the step loss must be the
    # mean over all counted tokens, computed here independently on the concatenated batch.
    model = fresh()
    x = torch.stack(tokens(4))
    batches = [{"input_ids": x[:2, :-1], "targets": x[:2, 1:].clone()},
               {"input_ids": x[2:, :-1], "targets": x[2:, 1:].clone()}]
    batches[0]["targets"][:, 3:] = IGNORE_INDEX  # few tokens count in the first half

    class Source:
        i = 0
        def next_batch(self, n):
            self.i += 1
            return batches[(self.i - 1) % 2]

    with torch.no_grad():
        logits = model(torch.cat([b["input_ids"] for b in batches]))
        targets = torch.cat([b["targets"] for b in batches])
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                     ignore_index=IGNORE_INDEX).item()
    r = train(model, LanguageModeling(), Source(), quiet(steps=1, batch_size=4, micro_batch_size=2),
              tmp_path)
    assert r.losses[0] == pytest.approx(expected, rel=1e-5)


# ---- resume reproduces the uninterrupted run exactly ------------------------------------
def test_resume_equals_uninterrupted(tmp_path):
    data = tokens()
    straight = train(fresh(), LanguageModeling(), data,
                     quiet(steps=6, batch_size=4, micro_batch_size=2, warmup_steps=2), tmp_path / "a")
    first = train(fresh(), LanguageModeling(), data,
                  quiet(steps=6, batch_size=4, micro_batch_size=2, warmup_steps=2, checkpoint_every=3),
                  tmp_path / "b")
    assert first.step == 6
    # Simulate an interruption after step 3: drop the later checkpoint, resume a new model.
    import shutil
    shutil.rmtree(tmp_path / "b/checkpoints/step-6")
    (tmp_path / "b/checkpoints/latest").unlink()
    resumed = train(fresh(seed=123), LanguageModeling(), data,
                    quiet(steps=6, batch_size=4, micro_batch_size=2, warmup_steps=2, checkpoint_every=3),
                    tmp_path / "b", resume=True)
    assert resumed.losses == straight.losses[3:]  # bit-for-bit
    logged = [json.loads(l) for l in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in logged if "loss" in r] == straight.losses
    # Step checkpoints open like any model directory.
    final = load_model(resumed.checkpoint)
    x = data[0][None, :-1]
    torch.testing.assert_close(final(x), load_model(straight.checkpoint)(x), rtol=0, atol=0)


def test_resume_without_checkpoint_and_fresh_over_old_run(tmp_path):
    with pytest.raises(LmlabError, match="nothing to resume"):
        train(fresh(), LanguageModeling(), tokens(), quiet(steps=1, batch_size=2), tmp_path, resume=True)
    train(fresh(), LanguageModeling(), tokens(), quiet(steps=1, batch_size=2), tmp_path)
    with pytest.raises(LmlabError, match="--resume"):
        train(fresh(), LanguageModeling(), tokens(), quiet(steps=1, batch_size=2), tmp_path)


# ---- divergence, config errors -----------------------------------------------------------
def test_nan_loss_names_the_fix(tmp_path):
    model = fresh()
    with torch.no_grad():
        model.embed.weight[0] = float("nan")
    data = [torch.zeros(17, dtype=torch.long)] * 4
    with pytest.raises(LmlabError, match="lower train.lr"):
        train(model, LanguageModeling(), data, quiet(steps=2, batch_size=2), tmp_path)


def test_config_typos_name_the_closest_key():
    with pytest.raises(LmlabError, match="warmup_steps"):
        TrainConfig.from_dict({"warmup_step": 10})
    with pytest.raises(LmlabError, match="train.lr"):
        apply_overrides({"train": {}}, ["train.lrr=1e-3"], {"train": TrainConfig})
    with pytest.raises(LmlabError, match="micro_batch_size"):
        TrainConfig(batch_size=8, micro_batch_size=3)
    out = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=3e-4", "train.compile=true"], {"train": TrainConfig})
    assert TrainConfig.from_dict(out["train"]).lr == 3e-4 and out["train"]["compile"] is True


# ---- checkpoints are atomic --------------------------------------------------------------
def test_half_written_checkpoint_is_never_latest(tmp_path, monkeypatch):
    data = tokens()
    train(fresh(), LanguageModeling(), data, quiet(steps=2, batch_size=2, checkpoint_every=1), tmp_path)
    assert latest_checkpoint(tmp_path).name == "step-2"
    # A crash while writing step-3's optimizer state must leave step-2 as the latest.
    import lmlab.train.state as state
    real = state.save_state_dict
    def crash(tensors, path, *a, **k):
        if path.name == "optimizer.safetensors":
            raise KeyboardInterrupt
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(state, "save_state_dict", crash)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(), LanguageModeling(), data, quiet(steps=3, batch_size=2), tmp_path, resume=True)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-1", "step-2"]
    assert latest_checkpoint(tmp_path).name == "step-2"
    # A stray step dir without its trainer record (e.g. copied by hand) is not picked either.
    (tmp_path / "checkpoints/step-9").mkdir()
    (tmp_path / "checkpoints/latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step-2"


def test_sampler_order_independent_of_micro_batch():
    data = list(range(10))
    a = ShuffledBatches(data, seed=3, collate=list)
    b = ShuffledBatches(data, seed=3, collate=list)
    assert a.next_batch(8) + a.next_batch(8) == sum((b.next_batch(2) for _ in range(8)), [])
    assert sorted(ShuffledBatches(data, seed=3, collate=list).next_batch(10)) == data


def test_bf16_autocast_tracks_float32(tmp_path):
    data = tokens()
    a = train(fresh(), LanguageModeling(), data, quiet(steps=4, batch_size=4), tmp_path / "a")
    b = train(fresh(), LanguageModeling(), data, quiet(steps=4, batch_size=4, precision="bf16"), tmp_path / "b")
    assert b.losses == pytest.approx(a.losses, rel=2e-2)


def test_chunked_cross_entropy_matches_plain(tmp_path):
    model, x = fresh(), torch.stack(tokens(4))
    plain, _ = LanguageModeling()(model, x)
    chunked, _ = LanguageModeling(loss_chunk=7)(model, x)
    torch.testing.assert_close(chunked, plain)
    expected = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    torch.testing.assert_close(plain, expected)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    data = tokens()
    a = train(fresh(), LanguageModeling(), data, quiet(steps=2, batch_size=4), tmp_path / "a")
    b = train(fresh(), LanguageModeling(), data, quiet(steps=2, batch_size=4, compile=True), tmp_path / "b")
    assert b.losses == pytest.approx(a.losses, rel=1e-4)


def test_token_budget_sets_the_step_count():
    assert TrainConfig(tokens=1000, batch_size=2).total_steps(100) == 5
    assert TrainConfig(tokens=1001, batch_size=2).total_steps(100) == 6
    assert TrainConfig(steps=7).total_steps(100) == 7


def test_atomic_writes_get_ordinary_permissions(tmp_path, monkeypatch):
    """mkstemp creates owner-only (0600) files; what we write must get open()'s 0666 & ~umask."""
    import lmlab.io

    monkeypatch.setattr(lmlab.io, "UMASK", 0o022)
    lmlab.io.write_text_atomic(tmp_path / "x.txt", "hi")
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o644
