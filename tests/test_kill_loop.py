"""SIGKILL a training process at random moments (inside checkpoint writes too), resume each
time: the final weights equal an uninterrupted run's bit for bit, every checkpoint left
behind is complete and readable, and no more than one checkpoint interval is lost."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EVERY = 2
SCRIPT = f"""
import sys, torch
from lmlab.config import ModelConfig
from lmlab.model import build_model
from lmlab.train.config import TrainConfig
from lmlab.train.loop import train
from lmlab.train.objectives.lm import LanguageModeling
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
data = list(torch.randint(0, 64, (64, 17), generator=g))
torch.manual_seed(0)
model = build_model(ModelConfig(name="t", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                ffn_hidden=64, max_seq_len=32))
cfg = TrainConfig(steps=int(sys.argv[2]), batch_size=4, lr=3e-3, precision="float32", progress=False,
                  log_every=1, checkpoint_every={EVERY}, keep_checkpoints=2)
train(model, LanguageModeling(), data, cfg, sys.argv[1], resume="auto", log=lambda s: None)
"""


def start(run_dir: Path, steps: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(run_dir), str(steps)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            pass
    return max(steps, default=0)


def checkpoint_step(run_dir: Path) -> int:
    from lmlab.train.state import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    return 0 if ckpt is None else int(ckpt.name.split("-")[1])


def check_checkpoints_readable(run_dir: Path) -> None:
    from lmlab.checkpoint import load_state_dict
    from lmlab.hub import load_model
    from lmlab.train.state import STEP_DIR, read_trainer

    for path in (run_dir / "checkpoints").glob("step-*"):
        assert STEP_DIR.match(path.name)
        read_trainer(path)
        load_model(path)
        for name in ("optimizer", "rng"):
            load_state_dict(path / f"{name}.safetensors")


def kill_loop(tmp_path: Path, kills: int, steps: int, seed: int) -> None:
    straight = tmp_path / "straight"
    proc = start(straight, steps)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    run, rng = tmp_path / "killed", random.Random(seed)
    landed = {"steps": 0, "write": 0}
    for k in range(kills):
        proc = start(run, steps)
        in_write = k % 2 == 1  # every other kill lands while a checkpoint is being written
        target = logged_steps(run) + rng.randint(1, 4)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            writing = any((run / "checkpoints").glob(".tmp-step-*")) if (run / "checkpoints").is_dir() else False
            if (in_write and writing) or (not in_write and logged_steps(run) >= target):
                proc.send_signal(signal.SIGKILL)
                landed["write" if in_write else "steps"] += 1
                break
            time.sleep(0.002)
        proc.wait(timeout=30)
        if proc.returncode == 0:
            break  # finished before the kill landed
        assert proc.returncode == -signal.SIGKILL
        check_checkpoints_readable(run)
        assert logged_steps(run) - checkpoint_step(run) <= EVERY  # at most one interval lost
    assert landed["steps"] >= 1 and landed["write"] >= 1, landed
    proc = start(run, steps)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    a = (straight / f"checkpoints/step-{steps}/model.safetensors").read_bytes()
    b = (run / f"checkpoints/step-{steps}/model.safetensors").read_bytes()
    assert a == b
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_kill_loop_small(tmp_path):
    kill_loop(tmp_path, kills=3, steps=30, seed=0)


@pytest.mark.slow
def test_kill_loop_long(tmp_path):
    kill_loop(tmp_path, kills=20, steps=200, seed=1)
