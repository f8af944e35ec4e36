"""Supervised fine-tuning on chat data, full, LoRA or DoRA, through the one loop: what the
pipeline's `sft` stage and `lmlab finetune` run (one code path, one config shape).

    result = finetune(model, tokenizer, FinetuneConfig.from_dict(recipe), "runs/sft")

Writes into its directory what `train` writes (metrics, step checkpoints that open like
any model), plus `finetune_report.json` (trainable parameters, memory estimate, answer
exact match), `adapter/` (the adapter alone, for LoRA/DoRA, a checkpoint of kind `adapter`
over its base) and `model/` (a plain, merged model).

In `lmlab run` the base defaults to the pretrain stage's model and the data to the world
stage's `sft.jsonl`; `lmlab finetune --config R` names both in its recipe.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from lmlab.adapters import AdapterConfig, apply_adapters, parameter_report, save_adapter, strip_adapters
from lmlab.adapters.report import ParameterReport
from lmlab.checkpoint import save_model
from lmlab.config import from_mapping
from lmlab.data.chat import (
    ChatDataset, JinjaTemplate, RoleTokenTemplate, collate_rows, encode_conversations,
    one_per_row, pack_examples, read_chat_jsonl,
)
from lmlab.errors import LmlabError
from lmlab.io import write_json_atomic, write_text_atomic
from lmlab.train.config import TrainConfig
from lmlab.train.data import FixedBatches, ShuffledBatches
from lmlab.train.loop import TrainResult, evaluate, train
from lmlab.train.objectives.lm import LanguageModeling

METHODS = ("full", "lora", "dora")


@dataclass(frozen=True)
class ChatDataConfig:
    train: str = ""  # JSONL of conversations or prompt/response pairs (in `lmlab run`: the world's)
    val: str | None = None  # held-out JSONL: validation loss and answer exact match
    val_fraction: float = 0.0  # without `val`: hold out this share of `train` (its last records)
    # "lmlab": <|role|> ... <|end|> with the tokenizer's role tokens; or a path to a
    # directory/tokenizer_config.json whose stored `chat_template` is used.
    template: str = "lmlab"
    pack: bool = True  # several conversations per row, isolated by document masks
    seq_len: int | None = None  # default: the model's max_seq_len

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise LmlabError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class FinetuneConfig:
    base: str = ""  # the model to fine-tune, any format (in `lmlab run`: the pretrain stage's)
    out: str = "runs/finetune"  # run directory of `lmlab finetune` (`lmlab run`: run_dir/sft)
    method: str = "lora"  # full | lora | dora (overrides adapter.method)
    # Learning rate of method "full" (default: train.lr). Full fine-tuning usually wants
    # a rate several times lower than adapters do; comparisons should tune both.
    full_lr: float | None = None
    data: ChatDataConfig = field(default_factory=ChatDataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LmlabError(f"finetune method must be one of {', '.join(METHODS)}, got {self.method!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FinetuneConfig":
        return from_mapping(cls, data, where="finetune")


@dataclass
class FinetuneResult:
    train: TrainResult
    report: ParameterReport
    val_loss: float | None
    exact_match: float | None


def make_template(spec: str, tokenizer):
    if spec == "lmlab":
        return RoleTokenTemplate(tokenizer)
    return JinjaTemplate.from_tokenizer_config(spec, tokenizer)


def chat_rows(conversations, template, seq_len: int, pack: bool, pad_id: int) -> dict[str, torch.Tensor]:
    examples = encode_conversations(conversations, template, seq_len)
    return (pack_examples if pack else one_per_row)(examples, seq_len, pad_id)


def split_conversations(data: ChatDataConfig):
    """(train, val) conversations: `val` from its own file, or the last `val_fraction` of train."""
    train_convs = read_chat_jsonl(data.train)
    if data.val:
        return train_convs, read_chat_jsonl(data.val)
    n_val = int(len(train_convs) * data.val_fraction)
    if data.val_fraction and (n_val == 0 or n_val == len(train_convs)):
        raise LmlabError(f"data.val_fraction={data.val_fraction} of {len(train_convs)} conversations "
                         "leaves no validation or no training data; change it or give data.val")
    return (train_convs[:-n_val], train_convs[-n_val:]) if n_val else (train_convs, None)


def val_batches(rows: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """All held-out rows in order, collated like training batches."""
    dataset = ChatDataset(rows)
    return [collate_rows([dataset[i] for i in range(s, min(len(dataset), s + size))])
            for s in range(0, len(dataset), size)]


def prepare_model(model: nn.Module, method: str, adapter: AdapterConfig, optimizer: str = "adamw") -> ParameterReport:
    """Freeze and adapt (LoRA/DoRA), or unfreeze everything (full); return the report."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return parameter_report(model, optimizer)
    return apply_adapters(model, AdapterConfig(**{**asdict(adapter), "method": method}))


def finetune(model: nn.Module, tokenizer, cfg: FinetuneConfig, run_dir: str | Path, *,
             resume: bool | str = False, log: Callable[[str], None] = print,
             base_dir: str | Path | None = None) -> FinetuneResult:
    """Fine-tune `model` in place; `base_dir` (where the base is stored) is recorded in the
    saved adapter so it opens as base + adapter on its own."""
    run_dir = Path(run_dir)
    if not cfg.data.train:
        raise LmlabError("data.train is required: the path of a chat JSONL file")
    seq_len = cfg.data.seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise LmlabError(f"data.seq_len={seq_len} exceeds the model's context {model.config.max_seq_len}")
    template = make_template(cfg.data.template, tokenizer)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    train_convs, val_convs = split_conversations(cfg.data)
    train_rows = chat_rows(train_convs, template, seq_len, cfg.data.pack, pad_id)
    # Validation keeps one conversation per row: its metrics then do not depend on packing.
    val_rows = chat_rows(val_convs, template, seq_len, False, pad_id) if val_convs else None

    torch.manual_seed(cfg.train.seed)  # adapter initialisation (a resumed run loads its own)
    report = prepare_model(model, cfg.method, cfg.adapter)
    log(f"fine-tuning ({cfg.method}) on {train_rows['input_ids'].shape[0]} rows of {seq_len} tokens")
    log(report.format())
    objective = LanguageModeling(accuracy=True)
    train_cfg = cfg.train
    if cfg.method == "full" and cfg.full_lr is not None:
        train_cfg = replace(train_cfg, lr=cfg.full_lr)
    source = ShuffledBatches(ChatDataset(train_rows), seed=cfg.train.seed, collate=collate_rows)
    # Periodic validation (train.eval_every) on the held-out rows, logged with the metrics.
    periodic = (FixedBatches(ChatDataset(val_rows), train_cfg.micro, train_cfg.eval_batches, collate_rows)
                if val_rows is not None else None)
    result = train(model, objective, source, train_cfg, run_dir, val_data=periodic, tokenizer=tokenizer,
                   resume=resume, log=log,
                   extra={"finetune": {"method": cfg.method, "adapter": asdict(cfg.adapter)}})

    val_loss = em = None
    if val_rows is not None:
        from lmlab.eval.answers import exact_match

        held_out = val_batches(val_rows, train_cfg.micro)
        val_loss = evaluate(model, objective, held_out, train_cfg, torch.device(train_cfg.device),
                            result.precision)["loss"]
        em = exact_match(model, held_out, result.precision)
        log(f"validation: loss {val_loss:.4f}, answer exact match {em:.3f}")
    info = {"train": {"step": result.step, "val_loss": val_loss, "precision": result.precision.name}}
    if cfg.method != "full":
        save_adapter(model, run_dir / "adapter", base=base_dir)
        strip_adapters(model)  # a plain merged model that loads anywhere a model does
    save_model(model, run_dir / "model", tokenizer=tokenizer, extra=info)
    write_json_atomic(run_dir / "finetune_report.json", {
        "method": cfg.method, **report.to_dict(), "steps": result.step,
        "final_train_loss": result.losses[-1] if result.losses else None,
        "val_loss": val_loss, "answer_exact_match": em, "lr": train_cfg.lr,
        "seconds": result.seconds, "precision": result.precision.name,
    })
    return FinetuneResult(result, report, val_loss, em)


def compare_methods(base: nn.Module, tokenizer, cfg: FinetuneConfig, out_dir: str | Path,
                    methods: tuple[str, ...] = METHODS,
                    log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Fine-tune a copy of `base` with each method (same data, rank and steps) into
    `out_dir/<method>`; write `comparison.json` and `comparison.md`; return the rows."""
    out_dir = Path(out_dir)
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        res = finetune(copy.deepcopy(base), tokenizer, replace(cfg, method=method), out_dir / method, log=log)
        rows.append({
            "method": method, "trainable": res.report.trainable,
            "trainable_percent": res.report.trainable_percent,
            "lr": cfg.full_lr if method == "full" and cfg.full_lr is not None else cfg.train.lr,
            "final_train_loss": res.train.losses[-1] if res.train.losses else None,
            "val_loss": res.val_loss, "exact_match": res.exact_match,
            "seconds": time.perf_counter() - t0,
        })
    write_json_atomic(out_dir / "comparison.json", rows)
    table = ["| method | trainable | trainable % | lr | train loss | val loss | exact match | s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['method']} | {r['trainable']:,} | {r['trainable_percent']:.2f} | {r['lr']:g} | "
                     f"{_num(r['final_train_loss'])} | {_num(r['val_loss'])} | {_num(r['exact_match'])} | "
                     f"{r['seconds']:.0f} |")
    write_text_atomic(out_dir / "comparison.md", "\n".join(table) + "\n")
    log("\n".join(table))
    return rows


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def run_finetune(cfg: FinetuneConfig, out: str | Path, *, resume: bool | str = False,
                 log: Callable[[str], None] = print) -> FinetuneResult:
    """Open `cfg.base` (any format) and its tokenizer, fine-tune into `out`."""
    from lmlab.hub import load_model
    from lmlab.tokenizer import Tokenizer

    if not cfg.base:
        raise LmlabError("set `base:` to the directory of the model to fine-tune")
    model = load_model(cfg.base, device=cfg.train.device)
    return finetune(model, Tokenizer.load(cfg.base), cfg, out, resume=resume, log=log, base_dir=cfg.base)


def finetune_recipe(path: str | Path, method: str | None = None, overrides: list[str] = (),
                    resume: bool = False, compare: tuple[str, ...] = ()):
    """`lmlab finetune`: the sft stage alone, on the recipe's `base` and `data.train`
    (or, with `compare`, once per method, tabulated)."""
    from lmlab.config import load_yaml
    from lmlab.hub import load_model
    from lmlab.tokenizer import Tokenizer
    from lmlab.train.config import apply_overrides

    data = apply_overrides(load_yaml(path), list(overrides))
    if method is not None:
        data["method"] = method
    cfg = FinetuneConfig.from_dict(data)
    if not cfg.base:
        raise LmlabError(f"{path}: set `base:` to the directory of the model to fine-tune")
    if compare:
        unknown = [m for m in compare if m not in METHODS]
        if unknown:
            raise LmlabError(f"--compare {','.join(compare)}: unknown method(s) {unknown}; use {','.join(METHODS)}")
        model = load_model(cfg.base, device=cfg.train.device)
        return compare_methods(model, Tokenizer.load(cfg.base), cfg, cfg.out, tuple(compare))
    return run_finetune(cfg, cfg.out, resume=resume)


def default_sft() -> FinetuneConfig:
    """The `sft:` section of a `lmlab run` recipe that names none."""
    return FinetuneConfig(
        method="lora",
        # The chat role tokens never occur in the pretraining corpus: their rows must train.
        adapter=AdapterConfig(r=8, alpha=16.0, trainable=("embed", "lm_head")),
        train=TrainConfig(steps=200, batch_size=8, lr=1e-2, warmup_steps=10, log_every=10))
