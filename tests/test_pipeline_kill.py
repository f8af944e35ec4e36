"""kill -9 during a stage, then `lmlab run --resume`: the run completes with the same final
metrics as an uninterrupted one. Tested in the pretrain and the sft stages (default tier,
one kill each); the slow tier kills at random moments many times."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_pipeline_recipe import TINY

ROOT = Path(__file__).resolve().parents[1]
# Enough steps that a kill lands mid-stage; float32 so both runs compute identically.
SETS = [s for s in TINY if not s.startswith(("train=", "sft.train="))] + [
    "train={steps: 30, batch_size: 4, log_every: 1, progress: false, precision: float32, checkpoint_every: 3}",
    "sft.train={steps: 30, batch_size: 4, progress: false, precision: float32, checkpoint_every: 3, lr: 1.0e-2}",
]


def command(run_dir: Path, corpus: Path, resume: bool, longer: bool = False) -> list[str]:
    sets = [*SETS, f"data.source={corpus}", *(["train.steps=200", "sft.train.steps=200"] if longer else [])]
    return [sys.executable, "-m", "lmlab", "run", "--run-dir", str(run_dir),
            *(["--resume"] if resume else []), *[x for s in sets for x in ("--set", s)]]


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def run_to_end(run_dir, corpus, resume=False, longer=False):
    out = subprocess.run(command(run_dir, corpus, resume, longer), env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def kill_when(run_dir, corpus, resume, ready, timeout=240, longer=False):
    """Start the run; SIGKILL it as soon as `ready(run_dir)` holds."""
    proc = subprocess.Popen(command(run_dir, corpus, resume, longer), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ready(run_dir):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode


def has_checkpoint(stage, at_least=1):
    def ready(run_dir):
        root = run_dir / stage / "checkpoints"
        return root.is_dir() and len([p for p in root.glob("step-*")]) >= at_least
    return ready


def final_metrics(run_dir: Path) -> dict:
    report = json.loads((run_dir / "sft/finetune_report.json").read_text())
    evaluated = json.loads((run_dir / "eval/world_eval.json").read_text())
    losses = [json.loads(line).get("loss") for line in (run_dir / "pretrain/metrics.jsonl").read_text().splitlines()]
    return {"pretrain_losses": [x for x in losses if x is not None],
            "sft": {k: report[k] for k in ("final_train_loss", "val_loss", "answer_exact_match", "steps")},
            "eval": {k: evaluated[k] for k in ("gold_reward_dense", "gold_reward_sparse", "examples")}}


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"sort the list {i} then {i + 1} and {i * 7 % 11}: done." for i in range(200)))
    return path


def test_kill_in_pretrain_and_in_sft_then_resume_matches_uninterrupted(tmp_path, corpus):
    straight = tmp_path / "straight"
    run_to_end(straight, corpus)
    run = tmp_path / "killed"
    assert kill_when(run, corpus, False, has_checkpoint("pretrain")) == -signal.SIGKILL
    assert not (run / "pretrain/stage.json").exists()
    assert kill_when(run, corpus, True, has_checkpoint("sft")) == -signal.SIGKILL
    assert (run / "pretrain/stage.json").exists() and not (run / "sft/stage.json").exists()
    run_to_end(run, corpus, resume=True)
    assert final_metrics(run) == final_metrics(straight)


@pytest.mark.slow
def test_random_kills_across_the_whole_run(tmp_path, corpus):
    """Killed at random moments (inside checkpoint writes too) until the run completes."""
    straight = tmp_path / "straight"
    t0 = time.monotonic()
    run_to_end(straight, corpus, longer=True)
    # Delays scale with this machine's speed, so several kills land before the run is done
    # on a fast CPU as on a slow one (fixed 1-4 s delays let a fast machine finish first).
    whole = time.monotonic() - t0
    run, rng, kills = tmp_path / "killed", random.Random(0), 0
    while not (run / "eval/stage.json").exists() and kills < 20:
        delay = rng.uniform(0.1, 0.3) * whole
        start = time.monotonic()
        kill_when(run, corpus, run.exists(), lambda _: time.monotonic() - start > delay, longer=True)
        kills += 1
    run_to_end(run, corpus, resume=True, longer=True)
    assert final_metrics(run) == final_metrics(straight)
    assert kills >= 3


# The whole lifecycle (the default recipe's stages) at toy sizes.
STEPS = "{steps: 6, batch_size: 4, progress: false, precision: float32, log_every: 1, checkpoint_every: 2}"
LIFECYCLE_SETS = [s for s in SETS if not s.startswith("stages=")] + [
    "curate.quality=null", "world.flip_rate=0.25",
    f"reward={{members: 2, eval_pairs: 20, lrs: [1.0e-3, 3.0e-3], seeds: [5, 6], adapter: {{r: 2}}, "
    f"probe: {STEPS}, train: {STEPS}}}",
    "rejection={n: 2, max_prompts: 4, max_new_tokens: 6, reward: warm/model, sft: {train: " + STEPS + "}}",
    "ppo={iterations: 3, reward: {kind: model, paths: [warm/model]}, rollout: {prompts: 2, group_size: 2, "
    "max_new_tokens: 4}, eval_n: 2, train: {progress: false, precision: float32, checkpoint_every: 1}}",
    f"dpo={{train: {STEPS}}}",
    f"proxy={{model: {{preset: nano, n_layers: 2, max_seq_len: 64}}, train: {STEPS}, tune_steps: 4, prompts: 4, "
    "max_new_tokens: 6, alphas: [0.0, 1.0]}",
]


def lifecycle_command(run_dir: Path, corpus: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "lmlab", "run", "--run-dir", str(run_dir), *(["--resume"] if resume else []),
            *[x for s in [*LIFECYCLE_SETS, f"data.source={corpus}"] for x in ("--set", s)]]


@pytest.mark.slow
def test_kill_inside_every_lifecycle_stage_then_resume_finishes(tmp_path):
    """`make demo`'s recipe, killed once inside each of its stages in turn (a moment after
    the stage's directory appears), resumed each time: the run finishes, every stage is
    complete, and the policies score as in an uninterrupted run."""
    from lmlab.pipeline import load_recipe

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"sort the list {i} then {i + 1} and "
                                          f"{i * 7 % 11}: done. " * 3}) + "\n" for i in range(150)))
    stages = load_recipe(None)[0].stages
    straight = tmp_path / "straight"
    done = subprocess.run(lifecycle_command(straight, corpus, False), env=env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run, killed = tmp_path / "killed", []
    rng = random.Random(0)
    for stage in stages:
        if (run / stage / "stage.json").exists():
            continue
        delay = rng.uniform(0.0, 0.5)
        seen: list[float] = []

        def ready(_, stage=stage):
            if (run / stage).is_dir() and not seen:
                seen.append(time.monotonic())
            return bool(seen) and time.monotonic() - seen[0] > delay

        proc = subprocess.Popen(lifecycle_command(run, corpus, run.exists()), env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not ready(run):
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed.append(stage)
        proc.wait(timeout=30)
    final = subprocess.run(lifecycle_command(run, corpus, True), env=env(), capture_output=True, text=True,
                           timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert all((run / s / "stage.json").is_file() for s in stages) and (run / "report.html").is_file()
    assert len(killed) >= len(stages) // 2, killed  # the quick stages may finish before the kill lands
    for name in ("pretrain", "sft", "reward", "ppo", "dpo", "proxy"):
        assert name in killed, (name, killed)

    def policies(root):
        return json.loads((root / "eval" / "world_eval.json").read_text())["policies"]

    assert policies(run) == policies(straight)
