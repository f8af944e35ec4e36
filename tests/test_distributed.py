"""Under torchrun (2 gloo ranks on this CPU) a step equals one process's step on the
concatenated batch, for DDP and FSDP2 and a DPO step with a frozen reference; checkpoints
resume across world sizes (2 -> 1, 1 -> 2, DDP -> FSDP2) with the same losses.

The oracle is the single-process loop on the same data (tests/distributed_cases.py), whose
arithmetic tests/test_train_loop.py checks against hand-computed values."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmlab
from lmlab.checkpoint import load_state_dict
from lmlab.errors import LmlabError
from lmlab.hub import load_model
from lmlab.train.config import TrainConfig
from lmlab.train.data import ShuffledBatches
from lmlab.train.distributed import SlicedSource, env_world

sys.path.insert(0, str(Path(__file__).parent))
import distributed_cases as cases  # noqa: E402

WORKER_TIMEOUT_S = 300
ATOL = 2e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    src = str(Path(lmlab.__file__).parents[1])
    env.update(PYTHONPATH=os.pathsep.join([src, str(script.parent)]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process oracle runs, then every 2-rank case in one torchrun launch."""
    root = tmp_path_factory.mktemp("dist")
    one, out = root / "one", root / "two"
    out.mkdir()
    model, result = cases.resume_run(one / "uninterrupted")
    cases.copy_step(one / "uninterrupted", 1, out / "from-1")
    done = torchrun(Path(cases.__file__), str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return {"one": one, "out": out, "losses": json.loads((out / "losses.json").read_text()),
            "uninterrupted": result.losses, "final": {k: v.clone() for k, v in model.state_dict().items()}}


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_state_dict(run_dir / "checkpoints" / f"step-{step}" / "model.safetensors")


def assert_same_weights(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert set(expected) == set(got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=ATOL, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_step_equals_one_process_on_the_concatenated_batch(runs, tmp_path, kind):
    model, result = cases.sft_step(tmp_path / "single")
    assert runs["losses"][f"sft-{kind}"] == pytest.approx(result.losses, abs=1e-6)
    assert_same_weights(model.state_dict(), weights(runs["out"] / f"sft-{kind}", 1))
    # The update moved weights by 100x the tolerance and more: the comparison can fail.
    start = cases.fresh().state_dict()
    assert max(float((model.state_dict()[k] - start[k]).abs().max()) for k in start) > 100 * ATOL


@pytest.mark.parametrize("case", ["dpo-fsdp", "dpo-ddp-replicated"])
def test_dpo_step_with_frozen_reference_equals_one_process(runs, tmp_path, case):
    model, result = cases.dpo_step(tmp_path / "single")
    assert runs["losses"][case] == pytest.approx(result.losses, abs=1e-6)
    assert_same_weights(model.state_dict(), weights(runs["out"] / case, 1))


def test_rollouts_generated_on_every_rank_under_fsdp_equal_one_process(runs, tmp_path):
    model, result = cases.rollout_run(tmp_path / "single")
    assert runs["losses"]["rollouts-fsdp"] == pytest.approx(result.losses, abs=1e-5)
    assert_same_weights(model.state_dict(), weights(runs["out"] / "rollouts-fsdp", 2))


def test_two_rank_run_equals_one_process_and_resumes_on_one(runs, tmp_path):
    assert runs["losses"]["two-ranks"] == pytest.approx(runs["uninterrupted"], abs=1e-5)
    cases.copy_step(runs["out"] / "two-ranks", 1, tmp_path / "resumed")
    model, result = cases.resume_run(tmp_path / "resumed", resume=True)
    assert result.losses == pytest.approx(runs["uninterrupted"][1:], abs=1e-5)
    assert_same_weights(runs["final"], model.state_dict())


def test_one_rank_checkpoint_resumes_on_two(runs):
    assert runs["losses"]["from-1"] == pytest.approx(runs["uninterrupted"][1:], abs=1e-5)
    assert_same_weights(runs["final"], weights(runs["out"] / "from-1", 3))


def test_ddp_checkpoint_resumes_under_fsdp(runs):
    assert runs["losses"]["ddp-to-fsdp"] == pytest.approx(runs["uninterrupted"][1:], abs=1e-5)
    assert_same_weights(runs["final"], weights(runs["out"] / "ddp-to-fsdp", 3))


def test_distributed_checkpoint_is_an_ordinary_model_directory_and_rank0_logs_once(runs):
    step = runs["out"] / "two-ranks" / "checkpoints" / "step-3"
    assert (step / "dcp").is_dir() and list((step / "dcp").glob("*.safetensors"))
    trainer = json.loads((step / "trainer.json").read_text())
    assert trainer["distributed"]["world_size"] == 2
    model = load_model(step)  # what `lmlab generate` opens
    assert_same_weights(runs["final"], model.state_dict())
    records = [json.loads(line) for line in (runs["out"] / "two-ranks" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]


# ---- pure pieces, no processes ---------------------------------------------------------
def test_rank_shards_of_the_permutation_add_up_to_the_single_process_batches():
    data = [torch.tensor([i]) for i in range(10)]
    one = ShuffledBatches(data, seed=3)
    ranks = [ShuffledBatches(data, seed=3).shard(r, 2) for r in range(2)]
    for _ in range(7):  # crosses epochs
        expected = one.next_batch(4).flatten().tolist()
        got = [i for s in ranks for i in s.next_batch(4).flatten().tolist()]
        assert got == expected
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()
    with pytest.raises(LmlabError, match="multiple of the number of processes"):
        ranks[0].next_batch(3)


def test_sliced_source_keeps_each_ranks_rows_of_dict_batches():
    class Source:
        def next_batch(self, n):
            return {"x": torch.arange(n), "meta": torch.tensor(7), "names": [f"r{i}" for i in range(n)]}

    parts = [SlicedSource(Source(), r, 2).next_batch(4) for r in range(2)]
    assert [p["x"].tolist() for p in parts] == [[0, 1], [2, 3]]
    assert [p["names"] for p in parts] == [["r0", "r1"], ["r2", "r3"]]
    assert int(parts[1]["meta"]) == 7


def test_world_detection_and_config_errors(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    assert env_world() is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert env_world() is None  # torchrun with one process is the single-process loop
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert env_world() == (1, 4, 1)
    with pytest.raises(LmlabError, match="train.distributed must be one of"):
        TrainConfig(distributed="zero3")
    with pytest.raises(LmlabError, match="train.distributed_frozen"):
        TrainConfig(distributed_frozen="offload")
