"""Training checkpoints: everything a resumed run needs to continue bit-for-bit.

    run_dir/checkpoints/step-N/
        config.json, model.safetensors, tokenizer.json   (lmlab.checkpoint.save_model: the
                                 trained model, loadable like any model directory)
        <name>.safetensors       further trained modules of the objective (a value head, ...)
        objective.safetensors    the objective's own state (an EMA reference, running stats)
        optimizer.safetensors    per-parameter AdamW moments and step counts
        rng.safetensors          torch CPU (and CUDA) generator states
        trainer.json             step, data position, optimizer hyperparameters, TrainConfig
    run_dir/checkpoints/latest   the name of the newest complete step-N directory

A checkpoint is written into a hidden temporary directory and renamed into place only when
complete, and `latest` is updated after that, so a crash at any moment leaves either the
previous checkpoint or the new one, never a half-written directory named step-N.
No pickle anywhere: tensors are safetensors, the rest JSON.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lmlab.checkpoint import load_state_dict, save_model, save_state_dict
from lmlab.errors import LmlabError
from lmlab.io import fsync_dir, write_json_atomic, write_text_atomic

TRAINER_FILE = "trainer.json"
OBJECTIVE_FILE = "objective.safetensors"
STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-step-"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split an optimizer state dict into flat tensors (safetensors) and JSON param groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, slots in sd["state"].items():
        for name, value in slots.items():
            tensors[f"{idx}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, sd["param_groups"]


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Delete half-written checkpoint directories a killed run left behind (only ours: the
    hidden `.tmp-step-*` names this module creates)."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for path in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(run_dir: str | Path, step: int, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer, trainer: dict[str, Any],
                    tokenizer: Any = None, keep: int = 0,
                    objective_state: dict[str, torch.Tensor] | None = None) -> Path:
    """`modules["model"]` is saved as a model directory; other trained modules beside it."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{step}-", dir=root))
    try:
        save_model(modules["model"], tmp, tokenizer=tokenizer)
        for name, module in modules.items():
            if name != "model":
                save_state_dict(module.state_dict(), tmp / f"{name}.safetensors")
        if objective_state:
            save_state_dict(objective_state, tmp / OBJECTIVE_FILE)
        tensors, groups = optimizer_tensors(optimizer)
        save_state_dict(tensors, tmp / "optimizer.safetensors")
        save_state_dict(rng_tensors(), tmp / "rng.safetensors")
        write_json_atomic(tmp / TRAINER_FILE, {**trainer, "step": step, "param_groups": groups})
        if final.exists():  # re-saving the same step (e.g. a resumed run that ends there)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    write_text_atomic(root / "latest", final.name + "\n")
    if keep > 0:
        _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))
    for _, path in steps[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def _complete(path: Path) -> bool:
    return (path / TRAINER_FILE).is_file() and (path / "config.json").is_file()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete step-N directory: the one `latest` names, else the highest N."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8").strip()
        if STEP_DIR.match(named.name) and _complete(named):
            return named
    steps = sorted((int(m.group(1)), p) for p in root.iterdir()
                   if (m := STEP_DIR.match(p.name)) and _complete(p))
    return steps[-1][1] if steps else None


def read_trainer(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / TRAINER_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LmlabError(f"{path / TRAINER_FILE} is unreadable ({e}); delete {path} to resume from an older one") from None


def _load_into(module: torch.nn.Module, file: Path, path: Path) -> None:
    state = load_state_dict(file)
    expected = module.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
        raise LmlabError(f"checkpoint {path} holds a different model than the recipe builds; "
                         "resume with the recipe the run was started with")
    module.load_state_dict(state)


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                    objective: Any = None) -> dict[str, Any]:
    """Load weights, objective state, optimizer and RNG state from `path`; return the
    trainer record."""
    trainer = read_trainer(path)
    for name, module in modules.items():
        _load_into(module, path / ("model.safetensors" if name == "model" else f"{name}.safetensors"), path)
    if objective is not None and hasattr(objective, "load_state_dict"):
        file = path / OBJECTIVE_FILE
        objective.load_state_dict(load_state_dict(file) if file.is_file() else {})
    restore_optimizer(optimizer, load_state_dict(path / "optimizer.safetensors"), trainer["param_groups"])
    restore_rng(load_state_dict(path / "rng.safetensors"))
    return trainer
