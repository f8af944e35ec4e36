"""Offline DPO of a language model on preference pairs, through the one loop: the library
behind the `dpo` stage and `lmlab align dpo`.

    result = train_dpo("runs/sft/model", "prefs.jsonl", "runs/dpo", DPOConfig())

The run directory gets what `train` writes (metrics.jsonl, step checkpoints), plus
`dpo_report.json` (settings, trainable parameters, implicit-reward metrics on training and
held-out pairs), `adapter/` (LoRA/DoRA: the adapter over its base) and `model/` (a plain,
merged model). With `sft_first`, `sft_first/` holds the SFT run on the chosen answers
(Xu et al. 2024: SFT on the preference data before DPO helps when that data was not
sampled from the policy), and DPO starts from `sft_first/model`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from lmlab.adapters import AdapterConfig, save_adapter, strip_adapters
from lmlab.config import from_mapping
from lmlab.data.preference import (
    PLAIN, PairEncoder, PreferenceCollator, PreferenceDataConfig, PreferenceDataset, PreferencePair, encode_pairs,
    pad_id_of,
    read_preference_jsonl,
)
from lmlab.errors import LmlabError
from lmlab.io import write_json_atomic, write_jsonl_atomic
from lmlab.train.config import TrainConfig
from lmlab.train.data import FixedBatches, ShuffledBatches
from lmlab.train.loop import TrainResult, evaluate, train
from lmlab.train.losses import DPO_LOSSES
from lmlab.train.objectives.dpo import ADAPTERS, DPO, frozen_copy

METHODS = ("full", "lora", "dora")
# auto: the adapter-disabled base for LoRA/DoRA, a frozen copy for TR-DPO, else reference
# log-probs precomputed once with the start policy (no copy kept while training).
REFERENCES = ("auto", "adapters", "copy", "precompute")
REPORT = "dpo_report.json"


@dataclass(frozen=True)
class IterativeConfig:
    rounds: int = 2
    samples: int = 4  # answers sampled per prompt; the pair is best vs worst by the reward
    prompts: int = 0  # prompts per round, the data's first ones (0: all of data.train's)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float | None = None
    batch_size: int = 32  # rows generated at once
    # "gold" (the world's programmatic reward), a reward-model directory, or several joined
    # by commas (an ensemble, mean of the members).
    reward: str = "gold"
    # false: every round's reference is the start policy; true: the policy the round starts from.
    refresh_reference: bool = False

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.samples < 2:
            raise LmlabError(f"iterative DPO needs rounds >= 1 and samples >= 2 (a best and a worst), "
                             f"got rounds={self.rounds}, samples={self.samples}")


def _default_adapter() -> AdapterConfig:
    return AdapterConfig(r=8, alpha=16.0)


@dataclass(frozen=True)
class DPOConfig:
    base: str = ""  # the start policy, any format (in `lmlab run`: the sft stage's model)
    out: str = "runs/dpo"  # run directory of `lmlab align dpo` (`lmlab run`: run_dir/dpo)
    method: str = "lora"  # full | lora | dora
    full_lr: float | None = None  # learning rate of method full (default train.lr)
    loss: str = "sigmoid"  # sigmoid | ipo | ipo_sum | cdpo | robust | hinge
    beta: float = 0.1
    label_smoothing: float = 0.0  # eps of cdpo / robust
    nll_weight: float = 0.0  # + weight * NLL of the chosen answer (Llama 3: 0.2)
    reference: str = "auto"  # auto | adapters | copy | precompute | a model directory
    cache_reference: bool = True  # reference log-probs once per example
    tr_tau: int = 0  # TR-DPO: refresh the reference every tau steps (0: never)
    tr_alpha: float = 1.0  # TR-DPO: ref <- alpha policy + (1 - alpha) ref (1: hard copy)
    sft_first: bool = False  # SFT on the chosen answers first (the paper's best practice)
    sft_train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100, batch_size=8, lr=1e-3,
                                                                       log_every=10))
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    adapter: AdapterConfig = field(default_factory=_default_adapter)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100, batch_size=8, lr=5e-4,
                                                                   weight_decay=0.0, log_every=10))
    iterative: IterativeConfig = field(default_factory=IterativeConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LmlabError(f"dpo method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.loss not in DPO_LOSSES:
            raise LmlabError(f"dpo loss must be one of {sorted(DPO_LOSSES)}, got {self.loss!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DPOConfig":
        return from_mapping(cls, data, where="dpo")


@dataclass
class DPOResult:
    train: TrainResult
    report: dict[str, Any]
    model_dir: Path


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def clean_pairs(pairs: Sequence[PreferencePair], where: str) -> tuple[list[PreferencePair], int]:
    """Pairs with an answer on both sides and a preference to learn. Pairs whose chosen
    equals rejected, or with an empty answer (a world's degenerate samples), are left out
    and counted; nothing left is an error naming why."""
    kept, identical, empty = [], 0, 0
    for p in pairs:
        if not p.chosen.strip() or not p.rejected.strip():
            empty += 1
        elif p.chosen == p.rejected:
            identical += 1
        else:
            kept.append(p)
    if not kept:
        raise LmlabError(f"{where}: no pair to learn from: {identical} have chosen equal to rejected and {empty} an "
                         "empty answer; DPO compares two different answers, check how the pairs were built")
    return kept, identical + empty


def split_pairs(data: PreferenceDataConfig) -> tuple[list[PreferencePair], list[PreferencePair] | None, int]:
    prefs = read_preference_jsonl(data.train)
    pairs, identical = clean_pairs(prefs.pairs, data.train)
    identical += prefs.skipped_identical
    if data.val:
        val = read_preference_jsonl(data.val)
        return pairs, clean_pairs(val.pairs, data.val)[0], identical
    n_val = int(len(pairs) * data.val_fraction)
    if data.val_fraction and (n_val == 0 or n_val == len(pairs)):
        raise LmlabError(f"data.val_fraction={data.val_fraction} of {len(pairs)} pairs leaves no validation or "
                         "no training pairs; change it or give data.val")
    return (pairs[:-n_val], pairs[-n_val:], identical) if n_val else (pairs, None, identical)


def chosen_conversations(pairs: Sequence[PreferencePair]) -> list[dict]:
    """The chosen answers as chat records, for SFT-then-DPO."""
    rows = []
    for p in pairs:
        prompt = [{"role": "user", "content": p.prompt}] if isinstance(p.prompt, str) else [dict(m) for m in p.prompt]
        rows.append({"messages": prompt + [{"role": "assistant", "content": p.chosen}]})
    return rows


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


def reference_mode(cfg: DPOConfig) -> str:
    if cfg.reference != "auto":
        return cfg.reference
    if cfg.tr_tau:
        return "copy"
    if cfg.method != "full" and not cfg.adapter.trainable:
        return ADAPTERS
    return "precompute"


def _batches(dataset, size: int, collate) -> list[dict[str, torch.Tensor]]:
    return [collate([dataset[i] for i in range(s, min(len(dataset), s + size))]) for s in range(0, len(dataset), size)]


def sft_on_chosen(policy: nn.Module, tokenizer, pairs: Sequence[PreferencePair], cfg: DPOConfig, out_dir: Path,
                  base_dir: str | Path | None, resume: bool, log: Callable[[str], None]) -> nn.Module:
    """SFT-then-DPO's first half, through `lmlab.train.finetune.finetune`: a completed run in
    `out_dir` (its report is written last) is reused."""
    from lmlab.hub import load_model
    from lmlab.train.finetune import ChatDataConfig, FinetuneConfig, finetune

    if (out_dir / "finetune_report.json").is_file() and resume:
        log(f"sft_first: complete in {out_dir}, reusing {out_dir / 'model'}")
        return load_model(out_dir / "model", device=cfg.train.device)
    if cfg.data.template == PLAIN:
        raise LmlabError("sft_first trains on chat records, which need a chat template (data.template: lmlab or a "
                         "tokenizer_config.json), not 'none'")
    out_dir.mkdir(parents=True, exist_ok=True)
    chat = out_dir / "chosen.jsonl"
    write_jsonl_atomic(chat, chosen_conversations(pairs))
    fcfg = FinetuneConfig(base=str(base_dir or ""), out=str(out_dir), method=cfg.method,
                          full_lr=cfg.full_lr, adapter=cfg.adapter, train=cfg.sft_train,
                          data=ChatDataConfig(train=str(chat), template=cfg.data.template,
                                              seq_len=cfg.data.seq_len))
    log(f"sft_first: SFT ({cfg.method}) on the {len(pairs)} chosen answers")
    finetune(policy, tokenizer, fcfg, out_dir, resume="auto" if resume else False, log=log, base_dir=base_dir)
    return policy  # merged in place by finetune


def dpo_on_pairs(policy: nn.Module, tokenizer, train_pairs: Sequence[PreferencePair],
                 val_pairs: Sequence[PreferencePair] | None, out_dir: str | Path, cfg: DPOConfig = DPOConfig(), *,
                 reference: nn.Module | None = None, base_dir: str | Path | None = None, resume: bool | str = False,
                 log: Callable[[str], None] = print, identical: int = 0) -> DPOResult:
    """The library form: DPO of the in-memory `policy` on in-memory pairs. `reference`
    replaces the configured one (a model over the same vocabulary, kept frozen)."""
    from lmlab.checkpoint import save_model
    from lmlab.precision import resolve
    from lmlab.train.finetune import prepare_model

    out_dir = Path(out_dir)
    train_pairs, more_identical = clean_pairs(train_pairs, "the training pairs")
    identical += more_identical
    if cfg.sft_first:
        policy = sft_on_chosen(policy, tokenizer, train_pairs, cfg, out_dir / "sft_first", base_dir,
                               bool(resume), log)
        base_dir = out_dir / "sft_first" / "model"
    max_len = cfg.data.seq_len or policy.config.max_seq_len
    if max_len > policy.config.max_seq_len:
        raise LmlabError(f"data.seq_len={max_len} exceeds the model's context {policy.config.max_seq_len}")
    encoder = PairEncoder(tokenizer, cfg.data.template)
    train_set = PreferenceDataset(encode_pairs(train_pairs, encoder, max_len, cfg.data.truncate))
    val_set = (PreferenceDataset(encode_pairs(clean_pairs(val_pairs, "the validation pairs")[0], encoder, max_len,
                                              cfg.data.truncate, first_index=len(train_set)))
               if val_pairs else None)
    collate = PreferenceCollator(pad_id_of(tokenizer), cfg.data.padding_side)

    mode = "given" if reference is not None else reference_mode(cfg)
    if mode not in REFERENCES + ("given",):  # a model directory
        from lmlab.hub import load_model

        reference, mode = load_model(mode, device=cfg.train.device), f"model {mode}"
    elif mode in ("copy", "precompute"):
        reference = frozen_copy(policy)  # the start policy, before any adapter
    torch.manual_seed(cfg.train.seed)  # adapter initialisation (a resumed run loads its own)
    report = prepare_model(policy, cfg.method, cfg.adapter)
    train_cfg = replace(cfg.train, lr=cfg.full_lr) if cfg.method == "full" and cfg.full_lr else cfg.train
    objective = DPO(beta=cfg.beta, loss=cfg.loss, label_smoothing=cfg.label_smoothing, nll_weight=cfg.nll_weight,
                    reference=ADAPTERS if mode == ADAPTERS else (None if mode == "precompute" else reference),
                    cache=cfg.cache_reference or mode == "precompute", tr_tau=cfg.tr_tau, tr_alpha=cfg.tr_alpha)
    log(f"DPO ({cfg.method}, loss {cfg.loss}, beta {cfg.beta}, reference {mode}) on {len(train_set)} pairs"
        + (f", {len(val_set)} held out" if val_set else "") + (f"; left out {identical} identical pairs"
                                                               if identical else ""))
    log(report.format())
    if mode == "precompute":
        device = torch.device(train_cfg.device)
        reference.to(device)
        with resolve(train_cfg.precision, device).autocast():
            for dataset in (train_set, val_set):
                if dataset is not None:
                    objective.precompute_reference(reference, _batches(dataset, train_cfg.micro, collate))
        reference = None  # no copy is kept while training
    source = ShuffledBatches(train_set, seed=train_cfg.seed, collate=collate)
    periodic = FixedBatches(val_set, train_cfg.micro, train_cfg.eval_batches, collate) if val_set else None
    result = train(policy, objective, source, train_cfg, out_dir, val_data=periodic, tokenizer=tokenizer,
                   resume=resume, log=log, extra={"dpo": {"method": cfg.method, "loss": cfg.loss, "beta": cfg.beta,
                                                          "reference": mode}})
    device = torch.device(train_cfg.device)
    train_metrics = evaluate(policy, objective, FixedBatches(train_set, train_cfg.micro, train_cfg.eval_batches,
                                                             collate), train_cfg, device, result.precision)
    val_metrics = (evaluate(policy, objective, _batches(val_set, train_cfg.micro, collate), train_cfg, device,
                            result.precision) if val_set else None)
    log(f"DPO: train pairs accuracy {train_metrics['accuracy']:.3f}, margin {train_metrics['margin']:.3f}"
        + (f"; held out accuracy {val_metrics['accuracy']:.3f}, margin {val_metrics['margin']:.3f}"
           if val_metrics else ""))
    if cfg.method != "full":
        save_adapter(policy, out_dir / "adapter", base=base_dir)
        strip_adapters(policy)
    model_dir = save_model(policy, out_dir / "model", tokenizer=tokenizer,
                           extra={"train": {"step": result.step, "objective": "dpo"}})
    info = {"method": cfg.method, "loss": cfg.loss, "beta": cfg.beta, "label_smoothing": cfg.label_smoothing,
            "nll_weight": cfg.nll_weight, "reference": mode, "tr_tau": cfg.tr_tau, "tr_alpha": cfg.tr_alpha,
            "sft_first": cfg.sft_first, **report.to_dict(), "steps": result.step, "lr": train_cfg.lr,
            "pairs": len(train_set), "val_pairs": len(val_set) if val_set else 0, "identical_left_out": identical,
            "train": train_metrics, "val": val_metrics, "seconds": result.seconds,
            "precision": result.precision.name}
    write_json_atomic(out_dir / REPORT, info)
    return DPOResult(result, info, Path(model_dir))


def train_dpo(base_dir: str | Path, out_dir: str | Path, cfg: DPOConfig = DPOConfig(), *,
              resume: bool | str = False, log: Callable[[str], None] = print) -> DPOResult:
    """Open the policy at `base_dir` (any format, with its tokenizer) and run DPO on
    `cfg.data.train` into `out_dir`."""
    from lmlab.hub import load_model
    from lmlab.tokenizer import Tokenizer

    if not cfg.data.train:
        raise LmlabError("data.train is required: the path of a preference JSONL file")
    train_pairs, val_pairs, identical = split_pairs(cfg.data)  # bad data is refused before loading
    policy = load_model(base_dir, device=cfg.train.device)
    return dpo_on_pairs(policy, Tokenizer.load(base_dir), train_pairs, val_pairs, out_dir, cfg, base_dir=base_dir,
                        resume=resume, log=log, identical=identical)


def load_dpo_recipe(path: str | Path, overrides: Sequence[str] = ()) -> DPOConfig:
    from lmlab.config import load_yaml
    from lmlab.train.config import apply_overrides

    cfg = DPOConfig.from_dict(apply_overrides(load_yaml(path), list(overrides)))
    if not cfg.base or not cfg.data.train:
        raise LmlabError(f"{path}: set `base:` (the policy's model directory, e.g. the SFT model) and "
                         "`data.train:` (preference JSONL)")
    return cfg


def dpo_recipe(path: str | Path, overrides: Sequence[str] = (), resume: bool = False,
               log: Callable[[str], None] = print) -> DPOResult:
    """`lmlab align dpo --config R`: a YAML of DPOConfig (base, out, method, loss, beta,
    reference, data, adapter, train, ...)."""
    cfg = load_dpo_recipe(path, overrides)
    return train_dpo(cfg.base, cfg.out, cfg, resume=resume, log=log)
