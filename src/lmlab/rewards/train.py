"""Train a reward model on preference pairs with the one loop, and score JSONL files.

    result = train_reward_model("runs/sft/model", "prefs.jsonl", "runs/rm", RewardConfig())

The run directory gets what `train` writes (metrics, checkpoints), `reward_report.json`
(parameters, pairwise accuracy and loss on the training and validation pairs),
`adapter/` (LoRA/DoRA: the adapter and the score head) and `model/`, a reward checkpoint
(`lmlab.rewards.io.load_reward_model`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from lmlab.adapters import AdapterConfig, apply_adapters, parameter_report, save_adapter, strip_adapters
from lmlab.adapters.report import ParameterReport
from lmlab.config import from_mapping
from lmlab.data.preference import (
    PairEncoder, PreferenceCollator, PreferenceDataConfig, PreferenceDataset, encode_pairs, pad_id_of,
    read_preference_jsonl,
)
from lmlab.errors import LmlabError
from lmlab.io import iter_jsonl, write_json_atomic, write_jsonl_atomic
from lmlab.model.heads import RewardModel
from lmlab.rewards.io import save_reward_model
from lmlab.train.config import TrainConfig
from lmlab.train.data import FixedBatches, ShuffledBatches
from lmlab.train.loop import TrainResult, train
from lmlab.train.objectives.reward import BradleyTerry

# head: a linear probe (only the score head trains), the shared start of WARM's members.
METHODS = ("full", "lora", "dora", "head")
HEAD = "score"  # the head's module name: trained in full under LoRA/DoRA too


@dataclass(frozen=True)
class RewardConfig:
    method: str = "lora"  # full | lora | dora | head (linear probe: the trunk stays frozen)
    full_lr: float | None = None  # learning rate of method full (default train.lr)
    center_weight: float = 0.0  # weight of mean((r_c + r_r)^2)
    head_init_std: float = 0.0  # 0: zero head (every pair starts at loss ln 2)
    # A reward checkpoint whose score head replaces the new one on a language-model base:
    # Baklava's members put WARM's one shared linear probe on other SFT checkpoints' trunks.
    head_from: str = ""
    eval_batch_size: int = 16
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LmlabError(f"reward method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.center_weight < 0 or self.head_init_std < 0:
            raise LmlabError("center_weight and head_init_std must be >= 0")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RewardConfig":
        return from_mapping(cls, data, where="reward")


@dataclass
class RewardTrainResult:
    train: TrainResult
    report: ParameterReport
    train_metrics: dict[str, float]
    val_metrics: dict[str, float] | None
    model_dir: Path


def prepare_reward_model(rm: RewardModel, method: str, adapter: AdapterConfig) -> ParameterReport:
    """Unfreeze everything (full), only the head (head), or adapt the trunk (LoRA/DoRA)
    with the head trained in full."""
    if method in ("full", "head"):
        for name, p in rm.named_parameters():
            p.requires_grad_(method == "full" or name.startswith(HEAD + "."))
        return parameter_report(rm)
    trainable = tuple(adapter.trainable) + (() if HEAD in adapter.trainable else (HEAD,))
    return apply_adapters(rm, AdapterConfig(**{**asdict(adapter), "method": method, "trainable": trainable}))


@torch.no_grad()
def evaluate_pairs(rm, dataset: PreferenceDataset, collate: PreferenceCollator, batch_size: int = 16,
                   objective: BradleyTerry | None = None) -> dict[str, float]:
    """Pairwise accuracy (ties count half), mean Bradley–Terry loss and mean margin over
    every pair of `dataset`."""
    objective = objective or BradleyTerry()
    was_training = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    totals = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
    n = 0
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
            batch = {k: v.to(device) for k, v in collate(items).items()}
            _, metrics = objective(rm, batch)
            for k in totals:
                totals[k] += float(metrics[k]) * len(items)
            n += len(items)
    finally:
        rm.train(was_training)
    return {k: v / n for k, v in totals.items()} | {"pairs": n}


def _split(pairs, data: PreferenceDataConfig):
    if data.val:
        return pairs, read_preference_jsonl(data.val).pairs
    n_val = int(len(pairs) * data.val_fraction)
    if data.val_fraction and (n_val == 0 or n_val == len(pairs)):
        raise LmlabError(f"data.val_fraction={data.val_fraction} of {len(pairs)} pairs leaves no validation or "
                         "no training pairs; change it or give data.val")
    return (pairs[:-n_val], pairs[-n_val:]) if n_val else (pairs, None)


def initial_reward_model(base_dir: str | Path, head_init_std: float = 0.0, device: str = "cpu",
                         head_from: str | Path | None = None) -> RewardModel:
    """The starting point: a reward checkpoint as it is (e.g. a linear probe, so WARM's
    members share trunk *and* head), or a language model (SFT; lmlab or Hugging Face)
    with a new head, or with the head of the reward checkpoint `head_from` (Baklava)."""
    from lmlab.checkpoint import is_lmlab_dir, read_config_json
    from lmlab.hub import load_model
    from lmlab.rewards.io import load_reward_model

    meta = read_config_json(base_dir)
    hf_classifier = any(a.endswith("ForSequenceClassification") for a in meta.get("architectures") or [])
    if hf_classifier or (is_lmlab_dir(base_dir) and meta.get("kind") == RewardModel.kind):
        if head_from:
            raise LmlabError(f"head_from puts a probe's head on a language model's trunk, but the base {base_dir} "
                             "is already a reward model: give an SFT checkpoint as the base, or drop head_from")
        return load_reward_model(base_dir, device=device)
    rm = RewardModel.from_lm(load_model(base_dir, device=device), head_init_std)
    if head_from:
        donor = load_reward_model(head_from, device=device)
        if donor.config != rm.config:
            diff = next(k for k in asdict(rm.config) if getattr(rm.config, k) != getattr(donor.config, k))
            raise LmlabError(f"the head of {head_from} was trained on another architecture than {base_dir} "
                             f"(model.{diff}: {getattr(donor.config, diff)!r} vs {getattr(rm.config, diff)!r}); "
                             "use a probe trained on a checkpoint of the same SFT run")
        with torch.no_grad():
            rm.score.weight.copy_(donor.score.weight)
    return rm


def train_reward_model(base_dir: str | Path, data_path: str | Path, out_dir: str | Path,
                       cfg: RewardConfig = RewardConfig(), *, resume: bool = False,
                       log: Callable[[str], None] = print) -> RewardTrainResult:
    """Fine-tune the model at `base_dir` (a language model, lmlab or HF, or a reward
    checkpoint such as a linear probe; with its tokenizer) into a reward model on the
    preference pairs of `data_path`; run directory `out_dir`."""
    from lmlab.tokenizer import Tokenizer

    out_dir = Path(out_dir)
    prefs = read_preference_jsonl(data_path)  # bad data is refused before anything is loaded
    if prefs.skipped_identical:
        log(f"left out {prefs.skipped_identical} pairs whose chosen equals rejected")
    train_pairs, val_pairs = _split(prefs.pairs, cfg.data)
    tokenizer = Tokenizer.load(base_dir)
    rm = initial_reward_model(base_dir, cfg.head_init_std, cfg.train.device, cfg.head_from or None)
    return train_reward_on_pairs(rm, tokenizer, train_pairs, val_pairs, out_dir, cfg, resume=resume, log=log,
                                 with_margin=prefs.has_margin)


def train_reward_on_pairs(rm: RewardModel, tokenizer, train_pairs, val_pairs, out_dir: str | Path,
                          cfg: RewardConfig = RewardConfig(), *, resume: bool = False, with_margin: bool = False,
                          log: Callable[[str], None] = print) -> RewardTrainResult:
    """The library form of `train_reward_model`: an in-memory RewardModel and pairs."""
    out_dir = Path(out_dir)
    max_len = cfg.data.seq_len or rm.config.max_seq_len
    if max_len > rm.config.max_seq_len:
        raise LmlabError(f"data.seq_len={max_len} exceeds the model's context {rm.config.max_seq_len}")
    encoder = PairEncoder(tokenizer, cfg.data.template)
    train_set = PreferenceDataset(encode_pairs(train_pairs, encoder, max_len, cfg.data.truncate))
    val_set = PreferenceDataset(encode_pairs(val_pairs, encoder, max_len, cfg.data.truncate)) if val_pairs else None
    collate = PreferenceCollator(pad_id_of(tokenizer), cfg.data.padding_side,
                                 with_margin=with_margin or any(p.margin is not None for p in train_pairs))
    report = prepare_reward_model(rm, cfg.method, cfg.adapter)
    log(f"reward model ({cfg.method}) on {len(train_set)} pairs"
        + (f", {len(val_set)} held out" if val_set else ""))
    log(report.format())
    objective = BradleyTerry(center_weight=cfg.center_weight)
    train_cfg = replace(cfg.train, lr=cfg.full_lr) if cfg.method == "full" and cfg.full_lr else cfg.train
    source = ShuffledBatches(train_set, seed=train_cfg.seed, collate=collate)
    val_batches = (FixedBatches(val_set, train_cfg.micro, train_cfg.eval_batches, collate)
                   if val_set is not None else None)
    result = train(rm, objective, source, train_cfg, out_dir, val_data=val_batches, tokenizer=tokenizer,
                   resume=resume, extra={"reward": {"method": cfg.method, "adapter": asdict(cfg.adapter)}})
    train_metrics = evaluate_pairs(rm, train_set, collate, cfg.eval_batch_size, objective)
    val_metrics = evaluate_pairs(rm, val_set, collate, cfg.eval_batch_size, objective) if val_set else None
    log(f"train pairs: accuracy {train_metrics['accuracy']:.3f}, loss {train_metrics['loss']:.4f}"
        + (f"; held out: accuracy {val_metrics['accuracy']:.3f}, loss {val_metrics['loss']:.4f}"
           if val_metrics else ""))
    if cfg.method in ("lora", "dora"):
        save_adapter(rm, out_dir / "adapter")
        strip_adapters(rm)
    model_dir = save_reward_model(rm, out_dir / "model", tokenizer=tokenizer, extra={
        "reward": {"template": cfg.data.template},
        "train": {"step": result.step, "val_loss": result.val_loss, "method": cfg.method}})
    write_json_atomic(out_dir / "reward_report.json", {
        "method": cfg.method, **report.to_dict(), "steps": result.step, "lr": train_cfg.lr,
        "train": train_metrics, "val": val_metrics, "seconds": result.seconds})
    return RewardTrainResult(result, report, train_metrics, val_metrics, model_dir)


def reward_train_recipe(path: str | Path, overrides: list[str] = (), resume: bool = False,
                        log: Callable[[str], None] = print) -> RewardTrainResult:
    """`lmlab reward train --config R`: a YAML with `base:`, `out:`, `data: {train: ...}`
    and the RewardConfig sections (method, data, adapter, train)."""
    from lmlab.config import load_yaml
    from lmlab.train.config import apply_overrides

    recipe = apply_overrides(load_yaml(path), list(overrides))
    base, out = recipe.pop("base", None), recipe.pop("out", "runs/reward")
    data = dict(recipe.get("data") or {})
    train_path = data.pop("train", None)
    if not base or not train_path:
        raise LmlabError(f"{path}: set `base:` (the SFT model directory) and `data.train:` (preference JSONL)")
    cfg = RewardConfig.from_dict({**recipe, "data": data})
    return train_reward_model(base, train_path, out, cfg, resume=resume, log=log)


# ---------------------------------------------------------------------------------------
# Scoring files
# ---------------------------------------------------------------------------------------


def _score_requests(path: Path) -> list[tuple[dict, list[tuple[str, Any, str]]]]:
    """Per line: the record and its (output key, prompt, completion) requests."""
    from lmlab.data.preference import pair_from_record

    out = []
    for n, record in iter_jsonl(path):
        source = f"{path}:{n}"
        if not isinstance(record, dict):
            raise LmlabError(f"{source}: expected a JSON object, got {type(record).__name__}")
        if "chosen" in record or "rejected" in record:
            p = pair_from_record(record, source)
            reqs = [("chosen_score", p.prompt, p.chosen), ("rejected_score", p.prompt, p.rejected)]
        elif isinstance(record.get("messages"), list) and record["messages"]:
            msgs = record["messages"]
            last = msgs[-1]
            if not isinstance(last, dict) or last.get("role") != "assistant":
                raise LmlabError(f"{source}: the last message must be the assistant answer to score")
            reqs = [("score", msgs[:-1], last.get("content"))]
        else:
            completion = record.get("completion", record.get("response"))
            if not isinstance(record.get("prompt"), str) or not isinstance(completion, str):
                raise LmlabError(f"{source}: a line to score needs string 'prompt' and 'completion' (or "
                                 f"'response'), 'messages', or 'chosen'/'rejected'; found keys {sorted(record)}")
            reqs = [("score", record["prompt"], completion)]
        out.append((record, [(k, p, c, source) for k, p, c in reqs]))
    if not out:
        raise LmlabError(f"{path} holds nothing to score")
    return out


def score_file(rm_dir: str | Path, in_jsonl: str | Path, out_jsonl: str | Path, batch_size: int = 16,
               device: str = "cpu", template: str | None = None) -> int:
    """`lmlab reward score RM IN OUT`: copy every record of IN to OUT with its score added
    (`score`; `chosen_score` and `rejected_score` for pairs). OUT is written once, at the
    end, atomically. Returns the number of records."""
    from lmlab.rewards.base import ModelReward

    in_jsonl = Path(in_jsonl)
    if not in_jsonl.is_file():
        raise LmlabError(f"input file not found: {in_jsonl}")
    requests = _score_requests(in_jsonl)
    reward = ModelReward.from_dir(rm_dir, batch_size=batch_size, device=device, template=template)
    flat = [r for _, reqs in requests for r in reqs]
    ids = [reward.encode(p, c, source) for _, p, c, source in flat]
    scores = reward.score_ids(ids).tolist()
    rows, i = [], 0
    for record, reqs in requests:
        row = dict(record)
        for key, *_ in reqs:
            row[key] = scores[i]
            i += 1
        rows.append(row)
    return write_jsonl_atomic(out_jsonl, rows)
