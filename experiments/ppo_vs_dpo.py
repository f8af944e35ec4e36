"""PPO vs GRPO vs RLOO vs DPO (on the policy's own samples and on another model's pairs) vs
SFT-then-DPO vs iterative DPO on SortWorld, from one SFT policy (Xu et al. 2024, "Is DPO
superior to PPO for LLM alignment?": no, PPO wins when done right), one command:

    python experiments/ppo_vs_dpo.py --out runs/ppo-vs-dpo --seeds 0 1 2 [--quick]

Built once (shared by every seed and method): a SortWorld export, a 0.8M-parameter chat
model pretrained on its corpus and LoRA-tuned briefly on its SFT set (the ppo-base recipe,
`experiments/ppo-base.yaml`, under-trained so alignment has room), and a reward model
trained on the world's preference pairs (the noisy labeller: it likes length and the
filler "um", which the gold reward charges).

Two tasks, seven methods each, every seed:
- verifiable: the online methods get the sparse gold reward (1 for exactly the sorted
  symbols, stopped); DPO pairs are labelled by the same verifier;
- learned RM: the online methods optimise the reward model; DPO on the other model's pairs
  trains on exactly the pairs the RM was trained on; the policy's own samples are labelled
  by the RM.
Methods: ppo, grpo, rloo (`lmlab.align.online`); dpo_own (pairs sampled from the SFT policy:
best vs worst of `group` samples per prompt, `lmlab.align.iterative` with one round);
dpo_other (the world's pairs, sampled by SortWorld's synthetic policy, not our model: the
out-of-distribution case); sft_dpo (SFT on dpo_other's chosen answers, then DPO on them,
`lmlab.align.dpo` sft_first); iterative_dpo (`rounds` rounds of sample -> label -> DPO).

Budget, equal for all: `steps` optimizer steps of 2*dpo_batch = rollout_prompts*group
sequences each (online: one rollout, one epoch, one minibatch per step; DPO: dpo_batch
pairs), and where a method samples from the policy, as many samples as the online methods
generate. SFT-then-DPO spends half its steps on SFT; iterative DPO splits them over its
rounds.

Per (task, method, seed), greedy on the world's held-out prompts: dense gold reward, exact
match, KL to the SFT policy (sampled, summed k1), wall time of training; `--tune` instead
picks each method's learning rate on validation prompts (seed 0).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from lmlab.io import read_json, write_json_atomic, write_text_atomic
from lmlab.report.results import Claim, write_results

TASKS = ("verifiable", "learned_rm")
METHODS = ("ppo", "grpo", "rloo", "dpo_own", "dpo_other", "sft_dpo", "iterative_dpo")
LABELS = {"ppo": "PPO", "grpo": "GRPO", "rloo": "RLOO", "dpo_own": "DPO, own samples",
          "dpo_other": "DPO, other model's pairs", "sft_dpo": "SFT→DPO, other model's pairs",
          "iterative_dpo": "iterative DPO"}
TASK_LABELS = {"verifiable": "verifiable (sparse gold)", "learned_rm": "learned RM"}
METRICS = ("gold_dense", "exact_match", "kl_to_sft", "seconds")
# What each task is judged by: the verifier's own pass rate on the verifiable task (exact
# match = the sparse reward on greedy answers), the true reward a learned RM stands in for.
TARGET = {"verifiable": "exact_match", "learned_rm": "gold_dense"}
METRIC_LABELS = {"exact_match": "exact match", "gold_dense": "dense gold reward"}


def _default_lrs() -> dict[str, float]:
    # Chosen by `--tune` (seed 0, validation prompts, `best_lrs` over Settings.tune_grid per
    # task and method); the grid's table is in docs/experiments.md.
    return {"verifiable.ppo": 3e-4, "verifiable.grpo": 3e-4, "verifiable.rloo": 3e-4, "verifiable.dpo_own": 1e-4,
            "verifiable.dpo_other": 1e-5, "verifiable.sft_dpo": 1e-5, "verifiable.iterative_dpo": 1e-4,
            "learned_rm.ppo": 1e-5, "learned_rm.grpo": 1e-5, "learned_rm.rloo": 1e-5, "learned_rm.dpo_own": 1e-5,
            "learned_rm.dpo_other": 3e-5, "learned_rm.sft_dpo": 3e-5, "learned_rm.iterative_dpo": 1e-5}


@dataclass(frozen=True)
class Settings:
    world_n: int = 1000  # SFT prompts; 100 held-out prompts; 1800 preference pairs (the RM's)
    pretrain_steps: int = 300
    sft_steps: int = 16  # under-trained on purpose: greedy exact match 0.51 (0.90 after 25 steps)
    rm_steps: int = 200  # ~1.8 epochs of the 1800 pairs, batch 16
    rm_lr: float = 3e-4
    steps: int = 40  # optimizer steps of every method
    rollout_prompts: int = 16
    group: int = 4  # online: completions per prompt; DPO on own samples: samples per prompt
    dpo_batch: int = 32  # pairs per step: 64 sequences, as many as one rollout
    # SFT-then-DPO's SFT packs conversations (~17 tokens) into rows of 128 tokens: 8 rows
    # hold ~60 answers, about the tokens of one DPO step.
    sft_rows: int = 8
    beta: float = 0.1
    rounds: int = 2
    max_new_tokens: int = 16
    eval_n: int = 100
    lrs: dict[str, float] = field(default_factory=_default_lrs)
    tune_grid: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
    model: str | None = None  # a `model=` override of the ppo-base recipe (None: its 0.8M model)
    vocab: int | None = None


# A model small enough to pretrain in seconds that still sorts some prompts right (the
# verifiable task's DPO needs a right and a wrong sample of one prompt).
QUICK = Settings(world_n=200, pretrain_steps=250, sft_steps=40, rm_steps=5, steps=2, rollout_prompts=4, group=4,
                 dpo_batch=8, sft_rows=2, max_new_tokens=10, eval_n=8, tune_grid=(1e-4, 3e-4), vocab=300,
                 model="{preset: nano, n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 2, ffn_hidden: 172, "
                       "max_seq_len: 128}")
BASE_RECIPE = Path(__file__).resolve().parent / "ppo-base.yaml"


def quiet(*_):
    pass


# ---------------------------------------------------------------------------------------
# The shared base: world, SFT policy, reward model
# ---------------------------------------------------------------------------------------


def build_base(out: Path, s: Settings) -> Path:
    """The run directory holding world/ and sft/model (the ppo-base recipe)."""
    from lmlab.pipeline import load_recipe, run_pipeline
    from lmlab.worlds.export import export_world

    corpus = out / "world-corpus"
    if not (corpus / "world.json").is_file():
        export_world("sort", corpus, seed=0, n=s.world_n)
    run = out / "base"
    sets = ["stages=[tokenizer, shards, pretrain, world, sft]", f"data.source={corpus / 'corpus.jsonl'}",
            f"world.n={s.world_n}", f"train.steps={s.pretrain_steps}", f"sft.train.steps={s.sft_steps}",
            "train.precision=float32", "sft.train.precision=float32"]
    sets += [f"model={s.model}"] if s.model else []
    sets += [f"data.vocab_size={s.vocab}"] if s.vocab else []
    recipe, raw = load_recipe(BASE_RECIPE, sets)
    # Resume skips the stages whose settings are unchanged and reruns the others.
    run_pipeline(recipe, run, raw=raw, echo=quiet, resume=run.exists())
    return run


def base_key(s: Settings) -> dict:
    """The settings the base and the reward model depend on (their caches' key)."""
    return {k: v for k, v in asdict(s).items() if k in ("world_n", "pretrain_steps", "sft_steps", "rm_steps", "rm_lr",
                                                         "model", "vocab")}


def build_reward_model(run: Path, out: Path, s: Settings) -> tuple[Path, float]:
    """The RM on the world's training pairs, and the score an empty answer gets in online
    rollouts: the lowest the RM gives any answer it was trained on (its template cannot
    render an empty one; the gold reward, too, scores an empty answer near its floor)."""
    from lmlab.data.preference import PreferenceDataConfig, read_preference_jsonl
    from lmlab.rewards import ModelReward
    from lmlab.rewards.train import RewardConfig, train_reward_model
    from lmlab.train.config import TrainConfig

    info = out / "rm.json"
    if info.is_file():
        saved = read_json(info, "")
        if saved.get("key") == base_key(s):
            return Path(saved["model"]), saved["empty_score"]
    world = run / "world"
    cfg = RewardConfig(method="full", eval_batch_size=256,
                       data=PreferenceDataConfig(val=str(world / "preferences_test_id.jsonl")),
                       train=TrainConfig(steps=s.rm_steps, batch_size=16, lr=s.rm_lr, warmup_steps=min(10, s.rm_steps),
                                         weight_decay=0.0, precision="float32", progress=False, log_every=1000))
    if (out / "rm").exists():
        shutil.rmtree(out / "rm")
    res = train_reward_model(run / "sft" / "model", world / "preferences_train.jsonl", out / "rm", cfg, log=quiet)
    pairs = read_preference_jsonl(world / "preferences_train.jsonl").pairs
    rm = ModelReward.from_dir(res.model_dir, batch_size=256)
    scores = rm.score([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    saved = {"key": base_key(s), "model": str(res.model_dir), "empty_score": float(scores.min()),
             "train_accuracy": res.train_metrics["accuracy"], "val_accuracy": res.val_metrics["accuracy"]}
    write_json_atomic(info, saved)
    return res.model_dir, saved["empty_score"]


def other_model_pairs(run: Path, task: str) -> list:
    """The world's training pairs (SortWorld's synthetic policy, not our model). Learned-RM
    task: as labelled (what the RM was trained on). Verifiable task: relabelled by the
    verifier; pairs it cannot tell apart (both right or both wrong) are left out."""
    from lmlab.data.preference import PreferencePair, read_preference_jsonl
    from lmlab.rewards import GoldReward

    pairs = read_preference_jsonl(run / "world" / "preferences_train.jsonl").pairs
    if task == "learned_rm":
        return pairs
    verifier = GoldReward("sort", "sparse", ended=True)  # a pair's answers are closed turns
    a = verifier.score([p.prompt for p in pairs], [p.chosen for p in pairs])
    b = verifier.score([p.prompt for p in pairs], [p.rejected for p in pairs])
    return [PreferencePair(p.prompt, p.chosen, p.rejected) if x > y else PreferencePair(p.prompt, p.rejected, p.chosen)
            for p, x, y in zip(pairs, a.tolist(), b.tolist()) if x != y]


# ---------------------------------------------------------------------------------------
# One arm: (task, method, seed)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    run: Path  # the base run directory
    rm: Path
    empty_score: float
    eval_prompts: list[str]
    s: Settings


def online(ctx: Context, task: str, method: str, seed: int, lr: float, out: Path) -> tuple[dict, float]:
    from lmlab.align.online import OnlineRLConfig, RewardSpec, align_online
    from lmlab.train.rollout import RolloutConfig

    s = ctx.s
    reward = (RewardSpec(kind="gold", gold="sparse") if task == "verifiable"
              else RewardSpec(kind="model", paths=(str(ctx.rm),), batch_size=256))
    rollout = RolloutConfig(prompts=s.rollout_prompts, group_size=s.group, max_new_tokens=s.max_new_tokens, seed=seed,
                            empty_score=None if task == "verifiable" else ctx.empty_score)
    cfg = OnlineRLConfig(method=method, policy=str(ctx.run / "sft" / "model"),
                         prompts=str(ctx.run / "world" / "sft.jsonl"), eval_n=0, out=str(out),
                         iterations=s.steps, rollout=rollout, reward=reward)
    cfg = replace(cfg, train=replace(cfg.train, lr=lr, seed=seed, progress=False, precision="float32",
                                     log_every=max(1, s.steps // 4), checkpoint_every=0))
    res = align_online(cfg, out, log=quiet)
    return res.report, res.report["seconds"]


def dpo_config(ctx: Context, seed: int, lr: float, steps: int):
    from lmlab.align.dpo import DPOConfig, IterativeConfig
    from lmlab.train.config import TrainConfig

    s = ctx.s
    train = TrainConfig(steps=steps, batch_size=s.dpo_batch, lr=lr, weight_decay=0.0, warmup_steps=0, seed=seed,
                        precision="float32", progress=False, log_every=max(1, steps // 4), checkpoint_every=0)
    return DPOConfig(method="full", beta=s.beta, train=train,
                     sft_train=replace(train, batch_size=s.sft_rows),
                     iterative=IterativeConfig(samples=s.group, max_new_tokens=s.max_new_tokens, batch_size=256,
                                               refresh_reference=True))


def offline(ctx: Context, task: str, method: str, seed: int, lr: float, out: Path) -> tuple[Path, float]:
    """Train a DPO-family arm; returns its policy directory and wall time."""
    from lmlab.align.dpo import dpo_on_pairs
    from lmlab.align.iterative import iterative_dpo
    from lmlab.hub import load_model
    from lmlab.rewards import GoldReward, ModelReward
    from lmlab.tokenizer import Tokenizer
    from lmlab.data.chat import read_prompts

    s = ctx.s
    sft = ctx.run / "sft" / "model"
    t0 = time.perf_counter()
    if method in ("dpo_own", "iterative_dpo"):
        rounds = 1 if method == "dpo_own" else s.rounds
        # As many samples in all as the online methods generate: steps x rollout prompts x group.
        prompts = read_prompts(ctx.run / "world" / "sft.jsonl", s.steps * s.rollout_prompts // rounds)
        cfg = dpo_config(ctx, seed, lr, max(1, s.steps // rounds))
        cfg = replace(cfg, iterative=replace(cfg.iterative, rounds=rounds))
        label = (GoldReward("sort", "sparse") if task == "verifiable"
                 else ModelReward.from_dir(ctx.rm, batch_size=256))
        model_dir = iterative_dpo(sft, prompts, out, cfg, label, log=quiet).model_dir
    else:
        pairs = other_model_pairs(ctx.run, task)
        cfg = dpo_config(ctx, seed, lr, s.steps)
        if method == "sft_dpo":
            half = max(1, s.steps // 2)
            cfg = replace(cfg, sft_first=True, train=replace(cfg.train, steps=half),
                          sft_train=replace(cfg.sft_train, steps=half))
        model_dir = dpo_on_pairs(load_model(sft), Tokenizer.load(sft), pairs, None, out, cfg, base_dir=sft,
                                 log=quiet).model_dir
    return Path(model_dir), time.perf_counter() - t0


def evaluate(ctx: Context, policy_dir: Path, prompts: list[str]) -> dict[str, float]:
    from lmlab.align.online import evaluate_policy
    from lmlab.hub import load_model
    from lmlab.tokenizer import Tokenizer

    sft = ctx.run / "sft" / "model"
    return evaluate_policy(load_model(policy_dir), load_model(sft), Tokenizer.load(sft), prompts, "lmlab",
                           ctx.s.max_new_tokens, "sort")


# The settings an arm depends on beyond the base's (its cache key): changing one reruns
# only the arms that read it.
ARM_FIELDS = {"ppo": ("rollout_prompts",), "grpo": ("rollout_prompts",), "rloo": ("rollout_prompts",),
              "dpo_own": ("rollout_prompts", "dpo_batch", "beta"), "dpo_other": ("dpo_batch", "beta"),
              "sft_dpo": ("dpo_batch", "beta", "sft_rows"), "iterative_dpo": ("rollout_prompts", "dpo_batch", "beta",
                                                                             "rounds")}


def arm_settings(s: Settings, method: str) -> dict:
    d = asdict(s)
    return {**base_key(s), **{k: d[k] for k in ("steps", "group", "max_new_tokens") + ARM_FIELDS[method]}}


def run_arm(ctx: Context, task: str, method: str, seed: int, lr: float, where: Path, prompts: list[str]) -> dict:
    """One (task, method, seed) row, cached in `where/row.json` (reused only with the same
    settings); an interrupted arm is rerun from scratch."""
    key = {"settings": arm_settings(ctx.s, method), "lr": lr,
           "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()}
    cache = where / "row.json"
    if cache.is_file():
        saved = read_json(cache, "")
        if saved.get("key") == key:
            return saved["row"]
    if where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True)
    if method in ("ppo", "grpo", "rloo"):
        _, seconds = online(ctx, task, method, seed, lr, where)
        policy = where / "model"
    else:
        policy, seconds = offline(ctx, task, method, seed, lr, where)
    row = {"arm": f"{TASK_LABELS[task]}: {LABELS[method]}", "task": task, "method": method, "seed": seed, "lr": lr,
           **evaluate(ctx, policy, prompts), "seconds": seconds}
    write_json_atomic(cache, {"key": key, "row": row})
    return row


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.3f}{sd}"


def table(rows: list[dict], sft: dict, seeds: list[int]) -> list[str]:
    lines = ["| task | method | gold (dense) | exact match | KL to SFT | s | " + " | ".join(
        f"gold, seed {x}" for x in seeds) + " |", "|---|---|---|---|---|---|" + "---|" * len(seeds)]
    for task in TASKS:
        lines.append(f"| {TASK_LABELS[task]} | SFT policy | {sft['gold_dense']:.3f} | {sft['exact_match']:.3f} | 0 | | "
                     + " | ".join("" for _ in seeds) + " |")
        for method in METHODS:
            mine = [r for r in rows if r["task"] == task and r["method"] == method]
            if not mine:
                continue
            by_seed = {r["seed"]: r for r in mine}
            lines.append(f"| {TASK_LABELS[task]} | {LABELS[method]} | "
                         + " | ".join(mean_sd([r[k] for r in mine]) for k in ("gold_dense", "exact_match", "kl_to_sft"))
                         + f" | {statistics.fmean(r['seconds'] for r in mine):.0f} | "
                         + " | ".join(f"{by_seed[x]['gold_dense']:.3f}" if x in by_seed else "-" for x in seeds) + " |")
    return lines


def plot(rows: list[dict], sft: dict, out: Path) -> Path:
    from lmlab.io import atomic_path
    from lmlab.train.plot import figure, save_png

    fig, axes = figure(2, len(TASKS), size=(11, 6.5), dpi=100)
    for col, task in enumerate(TASKS):
        for r_i, (key, name) in enumerate((("gold_dense", "gold reward (dense)"), ("exact_match", "exact match"))):
            ax = axes[r_i][col]
            for x, method in enumerate(METHODS):
                vals = [r[key] for r in rows if r["task"] == task and r["method"] == method]
                if vals:
                    ax.bar(x, statistics.fmean(vals), color="C0" if x < 3 else "C1", alpha=0.55)
                    ax.plot([x] * len(vals), vals, "k.", markersize=7)
            ax.axhline(sft[key], color="gray", linestyle="--", linewidth=1, label="SFT policy")
            ax.set_xticks(range(len(METHODS)))
            ax.set_xticklabels([LABELS[m].replace(", ", ",\n") for m in METHODS], fontsize=7, rotation=30, ha="right")
            ax.set_ylabel(name)
            lo = min([r[key] for r in rows if r["task"] == task] + [sft[key]])
            ax.set_ylim(max(0.0, lo - 0.05), 1.0 if key == "exact_match" else max(1.0, lo + 0.1))
            ax.set_title(f"{TASK_LABELS[task]}: {name}", fontsize=10)
            ax.legend(fontsize=7, loc="best")
            ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "gold_by_method.png"
    with atomic_path(path) as tmp:
        save_png(fig, tmp)
    return path


CLAIM = Claim(source="Xu et al. 2024, \"Is DPO Superior to PPO for LLM Alignment? A Comprehensive Study\"",
              statement="PPO with its best practices (advantage normalisation, large batch, EMA reference) beats DPO; "
                        "DPO suffers when the preference data is not sampled from the policy, and SFT on that data "
                        "first or iterative DPO on fresh policy samples narrow the gap",
              paper_figure="PPO ahead of DPO and iterative DPO on every testbed (HH-RLHF, SafeRLHF, APPS, "
                           "CodeContests), at 7B-34B parameters")


def budget_text(s: Settings) -> str:
    rows = s.rollout_prompts * s.group
    return (f"Budget of every method: {s.steps} optimizer steps of {rows} sequences (online: {s.steps} rollouts of "
            f"{s.rollout_prompts} prompts x {s.group} samples, one epoch, one minibatch; DPO: {s.dpo_batch} pairs per "
            f"step); the methods that sample from the policy draw {s.steps * rows} samples in all (DPO on own "
            f"samples: {s.group} per prompt on {s.steps * s.rollout_prompts} prompts, one round; iterative DPO: "
            f"{s.rounds} rounds of {s.steps // s.rounds} steps); SFT→DPO: {s.steps // 2} SFT + {s.steps // 2} DPO "
            f"steps. Greedy evaluation on {s.eval_n} held-out prompts, {s.max_new_tokens} new tokens at most.")


def verdict(rows: list[dict], sft: dict) -> str:
    """Per task, in its target metric (TARGET) averaged over seeds: PPO against the best of
    the DPO family (a gap no larger than the larger of the two seed stds is called a tie),
    and GRPO or RLOO where one beats PPO by more than that."""
    parts = []
    for task in TASKS:
        key = TARGET[task]
        stats = {}
        for method in METHODS:
            vals = [r[key] for r in rows if r["task"] == task and r["method"] == method]
            if vals:
                stats[method] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        if "ppo" not in stats:
            continue
        dpo = [m for m in stats if m not in ("ppo", "grpo", "rloo")]
        ppo = stats["ppo"]
        text = f"{TASK_LABELS[task]}, {METRIC_LABELS[key]}: PPO {ppo[0]:.3f} (SFT {sft[key]:.3f})"
        if dpo:
            best = max(dpo, key=lambda m: stats[m][0])
            gap = ppo[0] - stats[best][0]
            call = ("tie within the seed spread" if abs(gap) <= max(ppo[1], stats[best][1])
                    else "PPO ahead" if gap > 0 else "DPO family ahead")
            text += f" vs best DPO-family {LABELS[best]} {stats[best][0]:.3f}: {call}"
        online = max((m for m in ("ppo", "grpo", "rloo") if m in stats), key=lambda m: stats[m][0])
        if online != "ppo" and stats[online][0] - ppo[0] > max(ppo[1], stats[online][1]):
            text += f"; {LABELS[online]} ahead of PPO ({stats[online][0]:.3f})"
        parts.append(text)
    return "; ".join(parts) + " (means over seeds)."


def best_lrs(tune_rows: list[dict]) -> dict[str, float]:
    """Per task and method, the learning rate with the best validation target metric
    (ties: the better dense gold reward, then the smaller rate)."""
    best: dict[str, dict] = {}
    for r in tune_rows:
        k = f"{r['task']}.{r['method']}"
        score = (r[TARGET[r["task"]]], r["gold_dense"], -r["lr"])
        if k not in best or score > best[k]["score"]:
            best[k] = {"score": score, "lr": r["lr"]}
    return {k: v["lr"] for k, v in best.items()}


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def setup(out: Path, s: Settings) -> tuple[Context, dict]:
    from lmlab.data.chat import read_prompts
    from lmlab.hub import load_model
    from lmlab.tokenizer import Tokenizer
    from lmlab.align.online import evaluate_policy

    t0 = time.perf_counter()
    run = build_base(out, s)
    rm, empty = build_reward_model(run, out, s)
    prompts = read_prompts(run / "world" / "eval.jsonl", s.eval_n)
    ctx = Context(run, rm, empty, prompts, s)
    sft = run / "sft" / "model"
    before = evaluate_policy(load_model(sft), None, Tokenizer.load(sft), prompts, "lmlab", s.max_new_tokens, "sort")
    print(f"base + reward model in {time.perf_counter() - t0:.0f} s; SFT policy: " + ", ".join(
        f"{k} {v:.3f}" for k, v in before.items()), flush=True)
    return ctx, before


def tune(ctx: Context, out: Path) -> list[dict]:
    """Each method's learning rate on validation prompts (the world's held-out preference
    prompts, disjoint from training and evaluation), seed 0, both tasks."""
    from lmlab.align.iterative import prompts_of

    val = prompts_of(ctx.run / "world" / "preferences_test_id.jsonl", ctx.s.eval_n)
    rows = []
    for task in TASKS:
        for method in METHODS:
            for lr in ctx.s.tune_grid:
                row = run_arm(ctx, task, method, 0, lr, out / "tune" / task / f"{method}-lr{lr:g}", val)
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("task", "method", "lr", "gold_dense", "exact_match",
                                                       "kl_to_sft", "seconds")}), flush=True)
    lines = ["| task | method | " + " | ".join(f"lr {lr:g}: gold / exact / KL" for lr in ctx.s.tune_grid) + " |",
             "|---|---|" + "---|" * len(ctx.s.tune_grid)]
    for task in TASKS:
        for method in METHODS:
            cells = []
            for lr in ctx.s.tune_grid:
                r = next(r for r in rows if r["task"] == task and r["method"] == method and r["lr"] == lr)
                cells.append(f"{r['gold_dense']:.3f} / {r['exact_match']:.2f} / {r['kl_to_sft']:.2f}")
            lines.append(f"| {TASK_LABELS[task]} | {LABELS[method]} | " + " | ".join(cells) + " |")
    chosen = best_lrs(rows)
    lines += ["", "Chosen (best validation " + ", ".join(f"{METRIC_LABELS[TARGET[t]]} on {TASK_LABELS[t]}"
                                                      for t in TASKS) + "): "
              + ", ".join(f"{k} {v:g}" for k, v in chosen.items())]
    write_json_atomic(out / "tune.json", {"rows": rows, "chosen": chosen})
    write_text_atomic(out / "tune.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/ppo-vs-dpo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--quick", action="store_true", help="a toy configuration (for the test): seconds")
    parser.add_argument("--tune", action="store_true", help="pick learning rates on validation prompts instead")
    parser.add_argument("--steps", type=int, help="optimizer steps of every method (default 40)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else Settings()
    if args.steps:
        s = replace(s, steps=args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Tiny models gain nothing from a second thread, and on a shared machine its spin-waits cost a lot.
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ctx, before = setup(out, s)
    if args.tune:
        tune(ctx, out)
        return 0
    rows = []
    for seed in args.seeds:
        for task in args.tasks:
            for method in args.methods:
                row = run_arm(ctx, task, method, seed, s.lrs[f"{task}.{method}"],
                              out / f"seed{seed}" / task / method, ctx.eval_prompts)
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("task", "method", "seed", "gold_dense", "exact_match",
                                                       "kl_to_sft", "seconds")}), flush=True)
    seconds = time.perf_counter() - t0
    rm_info = read_json(out / "rm.json", "")
    figure = plot(rows, before, out)
    command = "python experiments/ppo_vs_dpo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    notes = "\n".join([budget_text(s), "", *table(rows, before, args.seeds), "",
                       f"SFT policy (greedy, {len(ctx.eval_prompts)} held-out prompts): gold (dense) "
                       f"{before['gold_dense']:.3f}, exact match {before['exact_match']:.3f}. Reward model: pairwise "
                       f"accuracy {rm_info['train_accuracy']:.3f} on its training pairs, {rm_info['val_accuracy']:.3f} "
                       f"on held-out pairs. Learning rates: " + "; ".join(
                           f"{TASK_LABELS[t]}: " + ", ".join(f"{m} {s.lrs[f'{t}.{m}']:g}" for m in args.methods)
                           for t in args.tasks)
                       + f". Training time of all arms together: {sum(r['seconds'] for r in rows):.0f} s (this "
                       f"invocation: {seconds:.0f} s; arms already in the cache are not re-timed)."])
    write_results(out, name="ppo-vs-dpo", title="PPO vs GRPO vs RLOO vs the DPO family on SortWorld", claim=CLAIM,
                  command=command, metrics=list(METRICS), rows=rows, verdict=verdict(rows, before), notes=notes,
                  figures=[figure.name], extra={"settings": asdict(s), "seeds": args.seeds, "seconds": seconds,
                                                "sft": before, "reward_model": rm_info})
    print((out / "results.md").read_text())
    return 0

if __name__ == "__main__":
    sys.exit(main())
