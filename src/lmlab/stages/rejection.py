"""Stage `rejection` and `lmlab align rejection-sampling`: best-of-N answers of the policy
under a `Reward`, then supervised fine-tuning on them through the one SFT code path
(`lmlab.train.finetune.finetune`).

    rejection/samples.jsonl   every prompt's N answers with their reward (and gold) scores
    rejection/best.jsonl      the chosen answers as chat JSONL (the SFT data)
    rejection/rejection.json  n, KL(best-of-N || policy) = log N - (N-1)/N, mean reward and
                              gold reward of the chosen answers and of all samples
    rejection/model/, metrics.jsonl, checkpoints/, finetune_report.json   the SFT run

In `lmlab run` the policy is the sft stage's model and the prompts are the world's SFT
prompts (the first `max_prompts`); `lmlab align rejection-sampling --config R` names both.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from lmlab.config import from_mapping
from lmlab.errors import LmlabError
from lmlab.train.finetune import FinetuneConfig
from lmlab.train.config import TrainConfig

NEEDS = ("sft", "world")
SECTIONS = ("rejection",)

SAMPLES, BEST, REPORT = "samples.jsonl", "best.jsonl", "rejection.json"


def _default_rejection_sft() -> FinetuneConfig:
    # The policy already knows the chat tokens; a short LoRA run on its own best answers.
    return FinetuneConfig(method="lora", train=TrainConfig(steps=50, batch_size=8, lr=5e-3, warmup_steps=5,
                                                           log_every=10))


@dataclass(frozen=True)
class RejectionConfig:
    policy: str = ""  # the model that samples (in `lmlab run`: the sft stage's, or e.g. ppo/model)
    out: str = "runs/rejection"  # run directory of `lmlab align rejection-sampling`
    n: int = 8  # samples per prompt
    # "gold" | "gold:sparse" | a reward model directory (RM or WARM) | a list of them (ENS)
    reward: Any = "gold"
    ensemble: str = "mean"  # ENS mode for a list of rewards: mean | mean_minus_std
    ensemble_k: float = 1.0
    prompts: str | None = None  # JSONL of {"prompt"} or chat records (their first user turn)
    max_prompts: int = 64
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    batch_rows: int | None = None  # rows per decode call (default: all prompts x n at once)
    score_batch_size: int = 64
    gold: bool = True  # report SortWorld's gold reward beside the proxy (SortWorld prompts)
    sft: FinetuneConfig = field(default_factory=_default_rejection_sft)

    def __post_init__(self) -> None:
        from lmlab.rewards.best_of_n import check_n

        check_n(self.n)
        if self.max_prompts < 1:
            raise LmlabError(f"rejection.max_prompts must be >= 1, got {self.max_prompts}")
        if isinstance(self.reward, list):
            object.__setattr__(self, "reward", tuple(self.reward))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RejectionConfig":
        return from_mapping(cls, data, where="rejection")


CONFIG = ("rejection", RejectionConfig)


def read_prompts(path: str | Path, limit: int) -> list[str]:
    """The first `limit` prompts of a JSONL file (`lmlab.data.chat.read_prompts`), checked
    for best-of-N."""
    from lmlab.data.chat import read_prompts as read
    from lmlab.rewards.best_of_n import check_prompts

    return check_prompts(read(path, limit), where=f"prompts in {path}")


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def rejection_sample(cfg: RejectionConfig, prompts: list[str], out: str | Path, *, resume: bool | str = False,
                     log: Callable[[str], None] = print) -> dict:
    """Sample `cfg.n` answers per prompt from `cfg.policy`, keep the best under
    `cfg.reward`, write them as chat JSONL and fine-tune the policy on them into `out`."""
    import numpy as np

    from lmlab.hub import load_model
    from lmlab.io import write_json_atomic, write_jsonl_atomic
    from lmlab.precision import resolve
    from lmlab.rewards.best_of_n import (
        best_of_n, chosen_records, gold_pool, reward_from_spec, sample_pool,
    )
    from lmlab.train.finetune import finetune
    from lmlab.tokenizer import Tokenizer

    out = Path(out)
    if not cfg.policy:
        raise LmlabError("set `policy:` to the directory of the model that samples the answers")
    # Everything that can be refused is checked before sampling.
    reward = reward_from_spec(cfg.reward, cfg.ensemble, cfg.ensemble_k, cfg.score_batch_size, cfg.sft.train.device)
    model = load_model(cfg.policy, device=cfg.sft.train.device)
    tokenizer = Tokenizer.load(cfg.policy)
    precision = resolve(cfg.sft.train.precision, cfg.sft.train.device)
    pool = sample_pool(model, tokenizer, prompts, cfg.n, cfg.max_new_tokens, temperature=cfg.temperature,
                       top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed, batch_rows=cfg.batch_rows,
                       precision=precision)
    picked = best_of_n(pool, reward)
    gold = gold_pool(pool) if cfg.gold else None
    records = chosen_records(pool, picked)
    if not records:
        raise LmlabError(f"every one of the {cfg.n} answers to each of the {len(prompts)} prompts was empty: "
                         "nothing to fine-tune on; raise max_new_tokens or temperature, or check the policy")
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out / SAMPLES, (
        {"prompt": p, "answers": [
            {"text": a, "finish_reason": f, "reward": None if np.isneginf(s) else float(s),
             **({"gold": float(g)} if gold is not None else {}), "best": j == picked.index[i]}
            for j, (a, f, s, g) in enumerate(zip(pool.answers[i], pool.finish_reasons[i], picked.scores[i],
                                                 gold[i] if gold is not None else [None] * pool.n))]}
        for i, p in enumerate(pool.prompts)))
    write_jsonl_atomic(out / BEST, records)
    best_gold = [None if j is None else float(gold[p, j]) for p, j in enumerate(picked.index)] if gold is not None else []
    finite = picked.scores[np.isfinite(picked.scores)]
    report = {
        "n": cfg.n, "prompts": len(prompts), "chosen": len(records), "kl_best_of_n": picked.kl,
        "reward": list(cfg.reward) if isinstance(cfg.reward, tuple) else cfg.reward,
        "reward_best_mean": _mean(picked.best_scores()),
        "reward_sample_mean": float(finite.mean()) if finite.size else None,
        "gold_best_mean": _mean(best_gold), "gold_sample_mean": float(gold.mean()) if gold is not None else None,
        "empty_answers": int(np.isneginf(picked.scores).sum()),
    }
    log(f"best-of-{cfg.n} on {len(prompts)} prompts: KL {picked.kl:.3f} nats, reward "
        f"{report['reward_sample_mean']} -> {report['reward_best_mean']}"
        + (f", gold {report['gold_sample_mean']:.3f} -> {report['gold_best_mean']:.3f}" if gold is not None else ""))
    sft = replace(cfg.sft, base=cfg.policy, out=str(out),
                  data=replace(cfg.sft.data, train=str(out / BEST)))
    result = finetune(model, tokenizer, sft, out, resume=resume, log=log, base_dir=cfg.policy)
    report["sft"] = {"steps": result.train.step, "final_train_loss": result.train.losses[-1]
                     if result.train.losses else None, "val_loss": result.val_loss}
    write_json_atomic(out / REPORT, report)
    return report


def cost(recipe) -> float:
    from lmlab.stages.common import generated_tokens, train_tokens

    r = recipe.rejection
    return generated_tokens(r.max_prompts * r.n, r.max_new_tokens) + train_tokens(r.sft.train, 64)


def run(ctx) -> None:
    """The pipeline's rejection stage: the sft model samples the world's SFT prompts."""
    from lmlab.stages.common import in_run, policy_dir, require

    cfg = ctx.recipe.rejection
    # The reward may be an earlier stage's model (warm/model), the policy too (a chain).
    cfg = replace(cfg, policy=str(policy_dir(ctx, cfg.policy)), out=str(ctx.out), reward=in_run(ctx, cfg.reward))
    source = cfg.prompts or str(require(ctx.input("world") / "sft.jsonl", "world"))
    prompts = read_prompts(source, cfg.max_prompts)
    rejection_sample(cfg, prompts, ctx.out, resume="auto" if ctx.resume else False, log=ctx.echo)


def rejection_recipe(path: str | Path, overrides: list[str] = (), resume: bool = False,
                     log: Callable[[str], None] = print) -> dict:
    """`lmlab align rejection-sampling --config R`: a YAML holding the RejectionConfig keys
    (`policy`, `prompts` and `out` required)."""
    from lmlab.config import load_yaml
    from lmlab.train.config import apply_overrides

    cfg = RejectionConfig.from_dict(apply_overrides(load_yaml(path), list(overrides)))
    if not cfg.policy or not cfg.prompts:
        raise LmlabError(f"{path}: set `policy:` (the model that samples) and `prompts:` (a JSONL of prompts)")
    return rejection_sample(cfg, read_prompts(cfg.prompts, cfg.max_prompts), cfg.out, resume=resume, log=log)


__all__ = ["RejectionConfig", "read_prompts", "rejection_recipe", "rejection_sample", "run"]
