"""The loop's seams for multi-model objectives (trainable and frozen modules, objective state,
the after-step hook, generating sources, every validation metric) and its safety rules
(non-finite values, torn metrics, changed settings on resume, signals, stale temporaries)."""
import json
import os
import signal

import pytest
import torch
from torch import nn

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.model import build_model
from lmlab.train.config import TrainConfig
from lmlab.train.loop import TrainingInterrupted, train
from lmlab.train.objectives.lm import LanguageModeling
from lmlab.train.state import latest_checkpoint

CFG = ModelConfig(name="t", vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                  ffn_hidden=64, max_seq_len=32)


def tokens(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, 64, (n, 17), generator=g))


def fresh(seed=0):
    torch.manual_seed(seed)
    return build_model(CFG)


def quiet(**kw):
    return TrainConfig(**{"progress": False, "log_every": 1, "lr": 3e-3, "precision": "float32",
                          "batch_size": 4, **kw})


class WithCritic:
    """LM loss plus a trained side module (a 'value head' on the mean hidden state) and a
    frozen 'reference', an EMA of the policy's embedding as objective state, updated in
    after_step: everything PPO-like objectives need from the loop."""

    def __init__(self, eta=0.5):
        self.lm = LanguageModeling()
        self.head = nn.Linear(CFG.d_model, 1)
        self.reference = nn.Linear(CFG.d_model, 1)
        self.ema = None
        self.eta = eta
        self.model = None
        self.steps_seen = []

    def trainable_modules(self):
        return {"value": self.head}

    def frozen_modules(self):
        return {"reference": self.reference}

    def __call__(self, model, batch):
        self.model = model
        loss, metrics = self.lm(model, batch)
        hidden = model.hidden_states(batch[:, :-1]).mean(1)
        value = self.head(hidden).pow(2).mean()
        ref = self.reference(hidden.detach()).mean()
        metrics["value"] = value.detach()
        metrics["reference"] = ref.detach()
        return loss + value, metrics

    def after_step(self, step):
        self.steps_seen.append(step)
        w = self.model.embed.weight.detach()
        self.ema = w.clone() if self.ema is None else (1 - self.eta) * self.ema + self.eta * w

    def state_dict(self):
        return {} if self.ema is None else {"ema": self.ema}

    def load_state_dict(self, state):
        self.ema = state.get("ema")


def test_side_modules_train_frozen_stay_and_state_resumes_bit_identically(tmp_path):
    data = tokens()
    torch.manual_seed(1)
    straight = WithCritic()
    ref_before = straight.reference.weight.clone()
    head_before = straight.head.weight.clone()
    r1 = train(fresh(), straight, data, quiet(steps=4), tmp_path / "a")
    assert straight.steps_seen == [1, 2, 3, 4]
    assert not torch.equal(straight.head.weight, head_before)  # trained
    assert torch.equal(straight.reference.weight, ref_before)  # frozen
    assert straight.reference.weight.grad is None
    ckpt = r1.checkpoint
    assert (ckpt / "value.safetensors").is_file() and (ckpt / "objective.safetensors").is_file()

    torch.manual_seed(1)
    interrupted = WithCritic()
    train(fresh(), interrupted, data, quiet(steps=4, checkpoint_every=2), tmp_path / "b")
    import shutil
    shutil.rmtree(tmp_path / "b/checkpoints/step-4")
    (tmp_path / "b/checkpoints/latest").unlink()
    torch.manual_seed(99)
    resumed = WithCritic()  # different random head and reference: the checkpoint restores the head
    resumed.reference.load_state_dict(straight.reference.state_dict())
    r2 = train(fresh(seed=5), resumed, data, quiet(steps=4, checkpoint_every=2), tmp_path / "b", resume=True)
    assert r2.losses == r1.losses[2:]
    assert torch.equal(resumed.ema, straight.ema)
    assert torch.equal(resumed.head.weight, straight.head.weight)
    assert resumed.steps_seen == [3, 4]


def test_validation_reports_every_metric(tmp_path):
    data = tokens()
    r = train(fresh(), LanguageModeling(accuracy=True), data, quiet(steps=2), tmp_path, val_data=data[:4])
    assert set(r.val_metrics) >= {"loss", "token_accuracy"} and r.val_loss == r.val_metrics["loss"]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("val_token_accuracy" in rec for rec in logged)


def test_generating_source_runs_under_the_step_precision(tmp_path, monkeypatch):
    import lmlab.precision as precision

    monkeypatch.setattr(precision, "native_bf16", lambda device_type: (True, "test: forced native"))
    seen = []

    class Sampler:
        """Draws its batch from the model itself, as a rollout would."""
        def __init__(self, model):
            self.model, self.i = model, 0

        def next_batch(self, n):
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            with torch.no_grad():
                logits = self.model(torch.zeros(n, 1, dtype=torch.long))
            seen.append(logits.dtype)
            self.i += 1
            return torch.stack(tokens(n, seed=self.i))

        def state_dict(self):
            return {"i": self.i}

        def load_state_dict(self, state):
            self.i = state["i"]

    model = fresh()
    r = train(model, LanguageModeling(), Sampler(model), quiet(steps=1, precision="auto"), tmp_path)
    assert r.precision.name == "bf16" and seen == [torch.bfloat16, torch.bfloat16]


def test_nan_on_the_last_step_never_replaces_good_checkpoints(tmp_path):
    class ExplodesAt:
        def __init__(self, step):
            self.lm, self.step, self.n = LanguageModeling(), step, 0

        def __call__(self, model, batch):
            self.n += 1
            loss, m = self.lm(model, batch)
            return (loss * float("nan") if self.n == self.step else loss), m

    data = tokens()
    with pytest.raises(LmlabError, match=r"step 4.*last good checkpoint.*step-2"):
        train(fresh(), ExplodesAt(4), data, quiet(steps=4, checkpoint_every=2), tmp_path / "stop")
    assert latest_checkpoint(tmp_path / "stop").name == "step-2"
    lines = (tmp_path / "stop/metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # strict JSON: no NaN
    r = train(fresh(), ExplodesAt(3), data, quiet(steps=4, on_nonfinite="skip"), tmp_path / "skip")
    assert r.skipped_steps == 1 and r.step == 4
    skipped = [json.loads(line) for line in (tmp_path / "skip/metrics.jsonl").read_text().splitlines()
               if "skipped" in line]
    assert skipped == [{"step": 3, "skipped": "the loss", "value": None}]


def test_nan_weights_are_never_saved(tmp_path):
    class Poison:
        """Finite loss and gradients, but the last update overflows the weights."""
        lm = LanguageModeling()

        def __call__(self, model, batch):
            return self.lm(model, batch)

        def after_step(self, step):
            if step == 4:
                with torch.no_grad():
                    self.model_ref.embed.weight.fill_(float("inf"))

    obj, model = Poison(), fresh()
    obj.model_ref = model
    with pytest.raises(LmlabError, match="a weight became nan at step 4"):
        train(model, obj, tokens(), quiet(steps=4, checkpoint_every=2), tmp_path)
    assert latest_checkpoint(tmp_path).name == "step-2"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_torn_metrics_line_and_stale_temporaries_do_not_block_resume(tmp_path):
    data = tokens()
    train(fresh(), LanguageModeling(), data, quiet(steps=2, checkpoint_every=1), tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # a kill mid-write
    (tmp_path / "checkpoints/.tmp-step-3-abc").mkdir()
    r = train(fresh(), LanguageModeling(), data, quiet(steps=3), tmp_path, resume=True)
    assert r.step == 3 and not (tmp_path / "checkpoints/.tmp-step-3-abc").exists()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 3


def test_resume_refuses_changed_settings_but_allows_a_longer_run(tmp_path):
    data = tokens()
    train(fresh(), LanguageModeling(), data, quiet(steps=2), tmp_path)
    with pytest.raises(LmlabError, match=r"train.lr: 0.003 -> 0.001"):
        train(fresh(), LanguageModeling(), data, quiet(steps=3, lr=1e-3), tmp_path, resume=True)
    assert train(fresh(), LanguageModeling(), data, quiet(steps=3), tmp_path, resume=True).step == 3


def test_sigterm_finishes_the_step_checkpoints_and_says_how_to_resume(tmp_path):
    class SignalAt:
        lm = LanguageModeling()
        n = 0

        def __call__(self, model, batch):
            self.n += 1
            if self.n == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return self.lm(model, batch)

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="SIGTERM after step 2.*--resume"):
        train(fresh(), SignalAt(), tokens(), quiet(steps=5), tmp_path)
    assert latest_checkpoint(tmp_path).name == "step-2"
    assert signal.getsignal(signal.SIGTERM) == previous  # handlers restored
    assert train(fresh(), LanguageModeling(), tokens(), quiet(steps=5), tmp_path, resume=True).step == 5


def test_resume_auto_starts_fresh_without_a_checkpoint(tmp_path):
    r = train(fresh(), LanguageModeling(), tokens(), quiet(steps=1), tmp_path, resume="auto")
    assert r.step == 1 and latest_checkpoint(tmp_path).name == "step-1"
