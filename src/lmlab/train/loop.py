"""The one training loop. Objectives (LM, SFT, reward, DPO, PPO) plug in; they never own
the optimizer, schedule, precision, accumulation, checkpoints or logging — this module does.

    result = train(model, LanguageModeling(), ShardDataset(dir), TrainConfig(...), "runs/x")
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from lmlab.checkpoint import save_model
from lmlab.errors import LmlabError
from lmlab.io import write_text_atomic
from lmlab.train.config import TrainConfig
from lmlab.train.data import FixedBatches, ShuffledBatches
from lmlab.train.objectives.base import Objective, batch_tokens, batch_weight
from lmlab.train.schedule import lr_factor
from lmlab.train.state import latest_checkpoint, load_checkpoint, save_checkpoint

METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # optimizer steps completed in total (including before a resume)
    losses: list[float] = field(default_factory=list)  # per step, this session only
    val_loss: float | None = None
    tokens: int = 0  # tokens trained on in this session
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices of Linear layers only; norms, biases and embeddings get none."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) where the build supports it."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    groups = param_groups(model, cfg.weight_decay)
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


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _as_source(data: Any, cfg: TrainConfig):
    if hasattr(data, "next_batch"):
        return data
    if isinstance(data, Sequence) or hasattr(data, "__getitem__"):
        return ShuffledBatches(data, seed=cfg.seed)
    raise LmlabError("train() needs a dataset (len + [i]) or a batch source with next_batch(n)")


def _nonfinite_error(what: str, value: float, step: int, cfg: TrainConfig) -> LmlabError:
    hints = [f"lower train.lr (now {cfg.lr:g})"]
    if cfg.warmup_steps < 10:
        hints.append("add warmup (train.warmup_steps)")
    if cfg.grad_clip == 0:
        hints.append("enable train.grad_clip=1.0")
    if cfg.precision == "bf16":
        hints.append("or try train.precision=float32")
    return LmlabError(f"{what} became {value} at step {step + 1}: training diverged; " + ", ".join(hints))


def evaluate(model: nn.Module, objective: Objective, batches, cfg: TrainConfig,
             device: torch.device) -> float:
    """Weighted mean loss over `batches` (the same weighting as training). The objective's
    `loss` metric is used where it reports one: the task loss without regularisers such as
    a MoE router's auxiliary losses, so models with and without them compare fairly."""
    was_training = model.training
    model.eval()
    total = weight = 0.0
    with torch.no_grad(), autocast(cfg, device):
        for batch in batches:
            batch = to_device(batch, device)
            loss, metrics = objective(model, batch)
            w = batch_weight(objective, batch)
            total += float(metrics.get("loss", loss)) * w
            weight += w
    model.train(was_training)
    return total / max(weight, 1)


class MetricsLog:
    """Append-only JSONL; on resume, records after the checkpoint's step are dropped so the
    file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None:
            write_text_atomic(path, "")
        elif path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            write_text_atomic(path, "".join(line + "\n" for line in kept))
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def train(model: nn.Module, objective: Objective, data: Any, cfg: TrainConfig,
          run_dir: str | Path, *, val_data: Any = None, tokenizer: Any = None,
          resume: bool = False, seq_len: int | None = None,
          extra: dict[str, Any] | None = None) -> TrainResult:
    """Train `model` on batches of `data` with `objective`; write metrics, checkpoints and
    the final model (`run_dir/model`, loadable with `lmlab.load_model`) into `run_dir`.

    data: a dataset (`len`, `[i]` -> example; stacked into batches) or a batch source
        with `next_batch(n)` and `state_dict()`/`load_state_dict()` (see `lmlab.train.data`).
    val_data: a dataset for periodic validation loss (the first eval_batches batches), or
        a ready `FixedBatches` (e.g. with a collate for dict rows).
    resume: continue from the newest checkpoint in `run_dir/checkpoints`.
    seq_len: tokens per example, needed when `cfg.tokens` sets the length (default:
        `data.seq_len` if the dataset has one).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    model.to(device).train()
    source = _as_source(data, cfg)
    seq_len = seq_len or getattr(data, "seq_len", None)
    if cfg.tokens is not None and seq_len is None:
        raise LmlabError("train.tokens needs the sequence length; set train.steps instead")
    total = cfg.total_steps(seq_len or 1)
    optimizer = build_optimizer(model, cfg)

    start = 0
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise LmlabError(f"nothing to resume: no complete checkpoint in {run_dir / 'checkpoints'}; "
                             "run without --resume to start fresh")
        trainer = load_checkpoint(ckpt, model, optimizer)
        start = trainer["step"]
        if hasattr(source, "load_state_dict"):
            source.load_state_dict(trainer["data"])
    else:
        if latest_checkpoint(run_dir) is not None:
            raise LmlabError(f"{run_dir} already holds checkpoints: pass --resume to continue that "
                             "run, or choose a new run directory")
        torch.manual_seed(cfg.seed)

    has_val = val_data is not None and len(val_data) > 0
    val_batches = None
    if has_val:  # a dataset of stackable rows, or FixedBatches built with its own collate
        val_batches = val_data if isinstance(val_data, FixedBatches) else FixedBatches(
            val_data, cfg.micro, cfg.eval_batches)
    forward = torch.compile(objective.__call__) if cfg.compile else objective
    log = MetricsLog(run_dir / METRICS_FILE, start if resume else None)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def checkpoint(step: int) -> None:
        trainer = {"data": source.state_dict() if hasattr(source, "state_dict") else {},
                   "train_config": cfg.to_dict(), **(extra or {})}
        save_checkpoint(run_dir, step, model, optimizer, trainer, tokenizer, cfg.keep_checkpoints)

    result = TrainResult(run_dir=run_dir, step=start)
    bar = _progress(cfg, total, start)
    t0 = time.perf_counter()
    val_loss = None
    try:
        for step in range(start, total):
            lr = cfg.lr * lr_factor(step, total, cfg.warmup_steps, cfg.schedule,
                                    cfg.min_lr_ratio, cfg.decay_fraction)
            for g in optimizer.param_groups:
                g["lr"] = lr
            micro = [to_device(source.next_batch(cfg.micro), device) for _ in range(cfg.accumulation)]
            weights = [batch_weight(objective, b) for b in micro]
            total_weight = sum(weights) or 1
            step_loss, metrics, tokens = 0.0, {}, 0
            for batch, w in zip(micro, weights):
                with autocast(cfg, device):
                    loss, m = forward(model, batch)
                # Mean over the whole step's loss units, not a mean of micro-batch means:
                # micro-batches with more target tokens count for more, as in one big batch.
                (loss * (w / total_weight)).backward()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise _nonfinite_error("the loss", value, step, cfg)
                step_loss += value * w / total_weight
                for k, v in m.items():
                    metrics[k] = metrics.get(k, 0.0) + float(v) * w / total_weight
                tokens += batch_tokens(objective, batch)
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True))
                if not math.isfinite(grad_norm):
                    raise _nonfinite_error("the gradient norm", grad_norm, step, cfg)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            result.step, result.tokens = done, result.tokens + tokens
            result.losses.append(step_loss)
            elapsed = time.perf_counter() - t0
            if done % cfg.log_every == 0 or done == total:
                record = {"step": done, "loss": step_loss, "lr": lr, "tokens": result.tokens,
                          "tokens_per_s": result.tokens / elapsed, "elapsed_s": elapsed,
                          **{k: v for k, v in metrics.items() if k != "loss"}}
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                log.write(record)
            if val_batches is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == total):
                val_loss = evaluate(model, objective, val_batches, cfg, device)
                log.write({"step": done, "val_loss": val_loss})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{result.tokens / elapsed:,.0f}",
                                **({"val": f"{val_loss:.3f}"} if val_loss is not None else {}))
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total:
                checkpoint(done)
        result.seconds = time.perf_counter() - t0
        if result.step > start or latest_checkpoint(run_dir) is None:
            checkpoint(result.step)
        save_model(model, run_dir / "model", tokenizer=tokenizer,
                   extra={"train": {"step": result.step, "val_loss": val_loss}})
    finally:
        log.close()
        if bar is not None:
            bar.close()
    result.val_loss = val_loss
    return result


def _progress(cfg: TrainConfig, total: int, start: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
