"""The one training loop. Objectives (LM, SFT, reward, DPO, PPO) plug in; they never own
the optimizer, schedule, precision, accumulation, checkpoints or logging — this module does.

    result = train(model, LanguageModeling(), ShardDataset(dir), TrainConfig(...), "runs/x")

What an objective may declare (all optional; see `lmlab.train.objectives.base`):
- `trainable_modules()` further modules trained beside `model` (a value head): the
  optimizer covers them, they move to the device and are checkpointed;
- `frozen_modules()` modules it only reads (a reference policy, a reward model): moved to
  the device, put in eval mode, never given gradients;
- `state_dict()` / `load_state_dict()` state of its own (an EMA reference, running reward
  statistics) saved in every step checkpoint and restored on resume;
- `after_step(step)` called after each optimizer step (EMA update, reference refresh).
A batch source may generate its batches (rollouts): `next_batch` runs under the same
precision as the training step, and its `state_dict()` is checkpointed.

`train` writes metrics and step checkpoints; it exports nothing else. The caller (a stage)
saves what its objective produces.
"""
from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.io import write_text_atomic
from lmlab.precision import Resolved, resolve
from lmlab.train import distributed
from lmlab.train.config import TrainConfig
from lmlab.train.data import FixedBatches, ShuffledBatches
from lmlab.train.objectives.base import Objective, batch_tokens, batch_weight, frozen_modules, trainable_modules
from lmlab.train.schedule import lr_factor
from lmlab.train.state import (
    latest_checkpoint, read_trainer, remove_stale_temporaries,
)

METRICS_FILE = "metrics.jsonl"
# TrainConfig fields a resumed run may change: how long it runs and what it reports, never
# what a step computes.
RESUMABLE_CHANGES = frozenset({"steps", "tokens", "progress", "log_every", "eval_every", "eval_batches",
                               "checkpoint_every", "keep_checkpoints", "device",
                               "distributed", "distributed_frozen"})


class TrainingInterrupted(LmlabError):
    """SIGINT/SIGTERM: the current step finished, a checkpoint was saved."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # optimizer steps completed in total (including before a resume)
    losses: list[float] = field(default_factory=list)  # per step, this session only
    val_loss: float | None = None
    val_metrics: dict[str, float] = field(default_factory=dict)
    tokens: int = 0  # tokens trained on in this session
    seconds: float = 0.0
    skipped_steps: int = 0  # steps whose update was dropped (on_nonfinite="skip")
    precision: Resolved | None = None
    checkpoint: Path | None = None  # the final step checkpoint

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def param_groups(modules: nn.Module | Iterable[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices of Linear layers only; norms, biases and embeddings get none."""
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    embeddings = {id(m.weight) for mod in modules for m in mod.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in (p for mod in modules for p in mod.parameters()):
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(modules: nn.Module | Iterable[nn.Module], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) where the build supports it."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    groups = param_groups(modules, cfg.weight_decay)
    if not groups:
        raise LmlabError("nothing to train: every parameter is frozen (check the adapter targets "
                         "or the objective's trainable modules)")
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def _as_source(data: Any, cfg: TrainConfig):
    if hasattr(data, "next_batch"):
        return data
    if isinstance(data, Sequence) or hasattr(data, "__getitem__"):
        return ShuffledBatches(data, seed=cfg.seed)
    raise LmlabError("train() needs a dataset (len + [i]) or a batch source with next_batch(n)")


def _nonfinite_error(what: str, value: float, step: int, cfg: TrainConfig, run_dir: Path) -> LmlabError:
    hints = [f"lower train.lr (now {cfg.lr:g})"]
    if cfg.warmup_steps < 10:
        hints.append("add warmup (train.warmup_steps)")
    if cfg.grad_clip == 0:
        hints.append("enable train.grad_clip=1.0")
    if cfg.precision != "float32":
        hints.append("try train.precision=float32")
    hints.append("or set train.on_nonfinite=skip to drop such steps")
    good = latest_checkpoint(run_dir)
    kept = f"; the last good checkpoint ({good}) is kept" if good is not None else "; no checkpoint was written"
    return LmlabError(f"{what} became {value} at step {step}: training diverged{kept}. " + ", ".join(hints))


def finite(value: Any) -> Any:
    """JSON has no NaN or inf: non-finite numbers are logged as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def weights_finite(modules: Iterable[nn.Module]) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters())


def evaluate(model: nn.Module, objective: Objective, batches, cfg: TrainConfig,
             device: torch.device, precision: Resolved | None = None) -> dict[str, float]:
    """Every metric the objective reports, as a weighted mean over `batches` (the same
    weighting as training). `loss` is the objective's `loss` metric where it reports one:
    the task loss without regularisers such as a MoE router's auxiliary losses, so models
    with and without them compare fairly."""
    precision = precision or resolve(cfg.precision, device)
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    weight = 0.0
    with torch.no_grad(), precision.autocast():
        for batch in batches:
            batch = to_device(batch, device)
            loss, metrics = objective(model, batch)
            w = batch_weight(objective, batch)
            values = {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v * w
            weight += w
    model.train(was_training)
    return {k: v / max(weight, 1) for k, v in totals.items()}


class MetricsLog:
    """Append-only JSONL; on resume, records after the checkpoint's step are dropped so the
    file reads as one uninterrupted run. A torn last line (a kill mid-write) is dropped."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None:
            write_text_atomic(path, "")
        elif path.exists():
            kept = []
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= resume_step:
                    kept.append(line)
            write_text_atomic(path, "".join(line + "\n" for line in kept))
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps({k: finite(v) for k, v in record.items()}, allow_nan=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class _NoLog:
    """The metrics log of ranks other than 0."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class StopSignals:
    """While active, SIGINT and SIGTERM ask the loop to stop after the current step (a
    second SIGINT interrupts at once). Only the main thread can own signal handlers."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_resumable(trainer: dict[str, Any], cfg: TrainConfig, ckpt: Path) -> None:
    saved = trainer.get("train_config", {})
    now = cfg.to_dict()
    changed = sorted(k for k in now if k in saved and saved[k] != now[k] and k not in RESUMABLE_CHANGES)
    if changed:
        diffs = ", ".join(f"train.{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise LmlabError(f"cannot resume {ckpt} with changed settings ({diffs}): a resumed run must compute "
                         "what the original would have; resume with the original values or start a new run")


def train(model: nn.Module, objective: Objective, data: Any, cfg: TrainConfig,
          run_dir: str | Path, *, val_data: Any = None, tokenizer: Any = None,
          resume: bool | str = False, seq_len: int | None = None,
          extra: dict[str, Any] | None = None, log: Callable[[str], None] = print) -> TrainResult:
    """Train `model` (and the objective's further trainable modules) on batches of `data`;
    write metrics and step checkpoints into `run_dir`.

    data: a dataset (`len`, `[i]` -> example; stacked into batches) or a batch source
        with `next_batch(n)` and `state_dict()`/`load_state_dict()` (see `lmlab.train.data`).
    val_data: a dataset for periodic validation (the first eval_batches batches), or a
        ready `FixedBatches` (e.g. with a collate for dict rows).
    resume: True continues from the newest checkpoint in `run_dir/checkpoints` (an error if
        there is none); "auto" continues if there is one, else starts fresh.
    seq_len: tokens per example, needed when `cfg.tokens` sets the length (default:
        `data.seq_len` if the dataset has one).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)
    dist = distributed.setup(cfg)  # torchrun: DDP/FSDP2; one process: changes nothing
    log = log if dist.is_main else distributed.silent
    device = dist.device
    precision = resolve(cfg.precision, device)
    log(f"train: {precision.describe()}")
    trained = {"model": model, **trainable_modules(objective)}
    frozen = frozen_modules(objective)
    for module in trained.values():
        module.to(device).train()
    for module in frozen.values():
        module.to(device).eval().requires_grad_(False)
    objective = dist.wrap(objective, trained, frozen)
    source = dist.shard(_as_source(data, cfg))
    seq_len = seq_len or getattr(data, "seq_len", None)
    if cfg.tokens is not None and seq_len is None:
        raise LmlabError("train.tokens needs the sequence length; set train.steps instead")
    total = cfg.total_steps(seq_len or 1)
    optimizer = build_optimizer(trained.values(), cfg)

    start = 0
    existing = latest_checkpoint(run_dir)
    if resume and existing is not None:
        _check_resumable(read_trainer(existing), cfg, existing)
        trainer = dist.load_checkpoint(existing, trained, optimizer, objective)
        start = trainer["step"]
        if hasattr(source, "load_state_dict"):
            source.load_state_dict(trainer["data"])
        log(f"train: resuming from {existing} (step {start})")
    elif resume is True:
        raise LmlabError(f"nothing to resume: no complete checkpoint in {run_dir / 'checkpoints'}; "
                         "run without --resume to start fresh")
    elif existing is not None:
        raise LmlabError(f"{run_dir} already holds checkpoints: pass --resume to continue that "
                         "run, or choose a new run directory")
    else:
        torch.manual_seed(cfg.seed)
    resumed = start > 0 or (resume and existing is not None)

    has_val = val_data is not None and len(val_data) > 0
    val_batches = None
    if has_val:  # a dataset of stackable rows, or FixedBatches built with its own collate
        val_batches = val_data if isinstance(val_data, FixedBatches) else FixedBatches(
            val_data, cfg.micro, cfg.eval_batches)
    forward = torch.compile(objective.__call__) if cfg.compile else objective
    log_file = MetricsLog(run_dir / METRICS_FILE, start if resumed else None) if dist.is_main else _NoLog()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    after_step = getattr(objective, "after_step", None)

    def checkpoint(step: int) -> Path:
        if not weights_finite(trained.values()):
            raise _nonfinite_error("a weight", float("nan"), step, cfg, run_dir)
        trainer = {"data": source.state_dict() if hasattr(source, "state_dict") else {},
                   "train_config": cfg.to_dict(), "precision": precision.name, **(extra or {})}
        state = objective.state_dict() if hasattr(objective, "state_dict") else None
        return dist.save_checkpoint(run_dir, step, trained, optimizer, trainer, tokenizer, cfg.keep_checkpoints,
                               objective_state=state)

    result = TrainResult(run_dir=run_dir, step=start, precision=precision)
    if not resumed:
        log_file.write({"step": 0, "precision": precision.name, "precision_reason": precision.reason})
    bar = _progress(cfg, total, start) if dist.is_main else None
    t0 = time.perf_counter()
    val_metrics: dict[str, float] = {}
    try:
        with StopSignals() as signals:
            for step in range(start, total):
                done = step + 1
                lr = cfg.lr * lr_factor(step, total, cfg.warmup_steps, cfg.schedule,
                                        cfg.min_lr_ratio, cfg.decay_fraction)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                with precision.autocast():  # a generating source samples as the step computes
                    micro = [to_device(source.next_batch(cfg.micro), device) for _ in range(cfg.accumulation)]
                weights = [batch_weight(objective, b) for b in micro]
                total_weight = dist.total_weight(sum(weights)) or 1
                step_loss, metrics, tokens, bad = 0.0, {}, 0, None
                for batch, w in zip(micro, weights):
                    with precision.autocast():
                        loss, m = forward(model, batch)
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        bad = ("the loss", value)
                        break
                    # Mean over the whole step's loss units, not a mean of micro-batch means:
                    # micro-batches with more target tokens count for more, as in one big batch.
                    (loss * (w / total_weight)).backward()
                    step_loss += value * w / total_weight
                    for k, v in m.items():
                        metrics[k] = metrics.get(k, 0.0) + float(v) * w / total_weight
                    tokens += batch_tokens(objective, batch)
                step_loss, metrics, tokens = dist.reduce(step_loss, metrics, tokens)
                grad_norm = None
                if bad is None:
                    norm = (torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True) if cfg.grad_clip > 0
                            else torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
                    grad_norm = float(norm)
                    if not math.isfinite(grad_norm):
                        bad = ("the gradient norm", grad_norm)
                if bad is not None:
                    optimizer.zero_grad(set_to_none=True)
                    if cfg.on_nonfinite == "stop":
                        raise _nonfinite_error(bad[0], bad[1], done, cfg, run_dir)
                    result.skipped_steps += 1
                    log_file.write({"step": done, "skipped": bad[0], "value": bad[1]})
                else:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if after_step is not None:
                        after_step(done)

                result.step, result.tokens = done, result.tokens + tokens
                result.losses.append(step_loss)
                elapsed = time.perf_counter() - t0
                if bad is None and (done % cfg.log_every == 0 or done == total):
                    record = {"step": done, "loss": step_loss, "lr": lr, "tokens": result.tokens,
                              "tokens_per_s": result.tokens / elapsed, "elapsed_s": elapsed,
                              **{k: v for k, v in metrics.items() if k != "loss"}}
                    if grad_norm is not None:
                        record["grad_norm"] = grad_norm
                    log_file.write(record)
                if val_batches is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == total):
                    val_metrics = evaluate(model, objective, val_batches, cfg, device, precision)
                    log_file.write({"step": done, **{f"val_{k}": v for k, v in val_metrics.items()}})
                if bar is not None:
                    bar.update(1)
                    val = val_metrics.get("loss")
                    bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{result.tokens / elapsed:,.0f}",
                                    **({"val": f"{val:.3f}"} if val is not None else {}))
                if dist.agree(signals.received) and done < total:
                    path = checkpoint(done)
                    raise TrainingInterrupted(f"stopped by {signals.received} after step {done}; checkpoint "
                                              f"saved to {path}; continue with --resume")
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total:
                    checkpoint(done)
        result.seconds = time.perf_counter() - t0
        if result.step > start or latest_checkpoint(run_dir) is None:
            result.checkpoint = checkpoint(result.step)
        else:
            result.checkpoint = latest_checkpoint(run_dir)
    finally:
        log_file.close()
        if bar is not None:
            bar.close()
    result.val_metrics = val_metrics
    result.val_loss = val_metrics.get("loss")
    return result


def _progress(cfg: TrainConfig, total: int, start: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
