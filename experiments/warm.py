"""WARM vs ENS vs a single reward model on SortWorld's noisy labeller (Ramé et al. 2024:
WARM > ENS > single under label noise and distribution shift), one command:

    python experiments/warm.py --out runs/warm --seeds 0 1 2 [--quick]

Per seed:
1. export SortWorld twice from one seed, with the labeller flipping 0% and 25% of the labels
   (same prompts, same pairs, same random draws: a pair's label differs between the two
   exports exactly where the noisy labeller flipped it, so every corrupted training pair
   has its clean label);
2. pretrain + SFT a small chat model on the world (`lmlab.pipeline` stages tokenizer ->
   shards -> pretrain -> world -> sft), and a second one from another initialisation (the
   pretrain seed + 1000) for the mode-connectivity baseline;
3. per flip rate: a linear probe (`train_reward_model` method "head") on the SFT model,
   then `--members` full fine-tunes from that one shared probe with diversity in learning
   rate and data order (seed); also a probe + one member on the other base;
4. accuracies (ties count half) of: each member, the single best member (picked on the
   first half of the in-distribution test pairs, reported on the second half), ENS-M (mean
   of M members' scores) and WARM-M (`warm_average` of the same M members), M in {2, 6, 10}:
   - train_noisy: the training pairs with the labels trained on,
   - memorised: only the flipped training pairs, scored against their *flipped* label
     (high = the corruption was memorised),
   - train_clean: the training pairs against their clean labels,
   - id: held-out pairs of the training policy (cool sampler) on unseen prompts,
   - ood: the world's `test_ood` pairs: a hot sampler (temperature 2.0, far more and
     stranger errors) on further unseen prompts;
5. linear mode connectivity: in-distribution accuracy along (1-l)·A + l·B for two members
   of the shared init, and for member 0 against the member from the other base;
6. with --baklava, a second member set (Baklava, `lmlab.rewards.members`): the same M
   fine-tunes, member k starting from a different step checkpoint of the SFT run (spread
   over it, every `sft_checkpoint_every` steps) with the shared probe's head; rows bkl_*,
   and its own interpolation curve (its first and last member: the most distant starts);
7. best-of-N: the SFT policy samples `--n-max` answers per held-out prompt once; for every
   n = 1, 2, 4, ... the *expected* gold reward of the proxy's argmax over n samples
   (`expected_best_of_n`, exact over random n-subsets of the pool) under the single best
   RM, ENS-10 and WARM-10, against KL(best-of-n || policy) = log n - (n-1)/n.

Writes results.json, details.md (every seed and the means), experiment.json + results.md (the
unified form, lmlab.report.results) and PNG plots to --out.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lmlab.io import write_json_atomic, write_text_atomic
from lmlab.worlds.labeller import LabellerConfig


# The packaged short recipe under the overrides below; the default one runs the whole
# lifecycle with a noisy world, and this experiment's world stage must export clean labels.
RECIPE = "quick"

@dataclass(frozen=True)
class Settings:
    world_n: int = 1200  # SFT conversations; also sets the preference pairs (2160 train, 240 ID test, 600 OOD)
    vocab: int = 384
    model: str = "{preset: nano, n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 2, ffn_hidden: 172, max_seq_len: 64}"
    pretrain_steps: int = 250
    sft_steps: int = 80
    sft_checkpoint_every: int = 10  # the SFT run's step checkpoints: Baklava's starting points
    probe_steps: int = 60
    rm_steps: int = 250  # about 2 epochs of the training pairs
    rm_batch: int = 16
    members: int = 10
    ms: tuple[int, ...] = (2, 6, 10)
    # Diversity knobs: member i trains with lrs[i % len] and data-order seed i.
    lrs: tuple[float, ...] = (1e-3, 3e-4, 2e-3, 5e-4, 1.5e-3, 7e-4, 1e-3, 3e-4, 2e-3, 5e-4)
    flip_rates: tuple[float, ...] = (0.0, 0.25)
    bon_prompts: int = 24
    n_max: int = 256
    max_new_tokens: int = 16
    temperature: float = 1.0
    lmc_points: int = 11
    baklava: bool = False


QUICK = Settings(world_n=40, vocab=300, pretrain_steps=4, sft_steps=3, sft_checkpoint_every=1, probe_steps=3,
                 rm_steps=3, rm_batch=4, members=3, ms=(2, 3), bon_prompts=3, n_max=8, max_new_tokens=8, lmc_points=3)


def quiet(*_):
    pass


# ---------------------------------------------------------------------------------------
# Bases and reward models
# ---------------------------------------------------------------------------------------


def base_overrides(seed: int, s, corpus_world: Path, name: str) -> list[str]:
    """The recipe overrides of the base run (tokenizer -> sft on the world's own corpus, clean
    labels) that warm.py and warm_ppo.py share; `s` has world_n, vocab, model, pretrain_steps,
    sft_steps and sft_checkpoint_every."""
    return ["stages=[tokenizer, shards, pretrain, world, sft]", "world.flip_rate=0", f"data.vocab_size={s.vocab}",
            "data.seq_len=64", "data.val_fraction=0.05", f"data.source={corpus_world / 'corpus.jsonl'}",
            f"model={s.model}",
            f"train={{steps: {s.pretrain_steps}, batch_size: 16, lr: 3.0e-3, warmup_steps: 10, eval_every: 0, "
            f"log_every: 50, precision: float32, progress: false, seed: {seed}}}",
            f"world.seed={seed}", f"world.n={s.world_n}", "sft.data.seq_len=64",
            f"sft.train={{steps: {s.sft_steps}, batch_size: 8, lr: 1.0e-2, warmup_steps: 5, log_every: 50, "
            f"precision: float32, progress: false, checkpoint_every: {s.sft_checkpoint_every}, keep_checkpoints: 0}}",
            f"name={name}"]


def build_bases(seed: int, out: Path, s: Settings) -> tuple[Path, Path, Path]:
    """(world dir, SFT model, SFT model from another initialisation)."""
    from lmlab.pipeline import load_recipe, run_pipeline
    from lmlab.worlds.export import export_world

    corpus_world = out / "world-corpus"
    export_world("sort", corpus_world, seed=seed, n=s.world_n)
    sets = base_overrides(seed, s, corpus_world, f"warm-base-{seed}")
    recipe, raw = load_recipe(RECIPE, sets)
    main = out / "base"
    if not (main / "sft" / "stage.json").is_file():
        run_pipeline(recipe, main, raw=raw, echo=quiet, resume=main.exists())
    # The other initialisation: same tokenizer, shards and world, another pretrain seed.
    alt = out / "base-other-init"
    if not (alt / "sft" / "stage.json").is_file():
        alt.mkdir(parents=True, exist_ok=True)
        for stage in ("tokenizer", "shards", "world"):
            if not (alt / stage).exists():
                shutil.copytree(main / stage, alt / stage)
        shutil.copy(main / "run.json", alt / "run.json")
        other, raw2 = load_recipe(RECIPE, sets + [f"train.seed={seed + 1000}"])
        run_pipeline(other, alt, raw=raw2, echo=quiet, resume=True)
    return main / "world", main / "sft" / "model", alt / "sft" / "model"


def export_noisy(seed: int, out: Path, s: Settings, flip: float) -> Path:
    from lmlab.worlds.export import export_world

    path = out / f"world-flip{flip:g}"
    if not (path / "world.json").is_file():
        export_world("sort", path, seed=seed, n=s.world_n, labeller=LabellerConfig(flip_rate=flip))
    return path


def train_rm(base: Path, prefs: Path, out: Path, method: str, steps: int, lr: float, seed: int,
             s: Settings) -> Path:
    from lmlab.rewards.train import RewardConfig, train_reward_model
    from lmlab.train.config import TrainConfig

    if (out / "model" / "config.json").is_file():
        return out / "model"
    train = TrainConfig(steps=steps, batch_size=s.rm_batch, lr=lr, warmup_steps=min(10, steps // 5),
                        weight_decay=0.0, precision="float32", progress=False, log_every=1000, seed=seed)
    cfg = RewardConfig(method=method, train=train, eval_batch_size=256)
    # An interrupted earlier run continues from its last checkpoint.
    return train_reward_model(base, prefs, out, cfg, resume=out.exists(), log=quiet).model_dir


# ---------------------------------------------------------------------------------------
# Scoring pairs
# ---------------------------------------------------------------------------------------


def read_pairs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class EvalSet:
    prompts: list[str]
    chosen: list[str]
    rejected: list[str]

    @classmethod
    def of(cls, records: list[dict]) -> "EvalSet":
        # An empty answer (the hot sampler's edits can delete every symbol) cannot be
        # rendered as an assistant turn, so a reward model cannot score it: such pairs are
        # left out (none at the default settings).
        records = [r for r in records if r["chosen"].strip() and r["rejected"].strip()]
        return cls([r["prompt"] for r in records], [r["chosen"] for r in records], [r["rejected"] for r in records])

    def margins(self, reward) -> np.ndarray:
        """r(chosen) - r(rejected) per pair, in one scoring call."""
        n = len(self.prompts)
        s = reward.score(self.prompts * 2, self.chosen + self.rejected).double().numpy()
        return s[:n] - s[n:]


def accuracy(margins: np.ndarray) -> float | None:
    if margins.size == 0:
        return None
    return float(((margins > 0) + 0.5 * (margins == 0)).mean())


def eval_sets(noisy_dir: Path, clean_dir: Path) -> dict[str, EvalSet]:
    noisy = read_pairs(noisy_dir / "preferences_train.jsonl")
    clean = read_pairs(clean_dir / "preferences_train.jsonl")
    assert len(noisy) == len(clean) and all(
        {a["chosen"], a["rejected"]} == {b["chosen"], b["rejected"]} for a, b in zip(noisy, clean)), \
        "the two exports must hold the same pairs"
    flipped = [a for a, b in zip(noisy, clean) if a["chosen"] != b["chosen"]]
    # Held-out pairs are labelled by the labeller of the noisy export; score them against
    # the clean labels, as the paper evaluates on clean preferences.
    test = read_pairs(clean_dir / "preferences_test_id.jsonl")
    half = len(test) // 2
    return {"train_noisy": EvalSet.of(noisy), "memorised": EvalSet.of(flipped), "train_clean": EvalSet.of(clean),
            "val": EvalSet.of(test[:half]), "id": EvalSet.of(test[half:]),
            "ood": EvalSet.of(read_pairs(clean_dir / "preferences_test_ood.jsonl"))}


# ---------------------------------------------------------------------------------------
# Linear mode connectivity
# ---------------------------------------------------------------------------------------


def interpolation_curve(a_dir: Path, b_dir: Path, data: EvalSet, points: int) -> list[float]:
    from lmlab.checkpoint import WEIGHTS_FILE, load_state_dict
    from lmlab.rewards import ModelReward, load_reward_model
    from lmlab.tokenizer import Tokenizer

    a, b = load_state_dict(a_dir / WEIGHTS_FILE), load_state_dict(b_dir / WEIGHTS_FILE)
    rm, tok = load_reward_model(a_dir), Tokenizer.load(a_dir)
    accs = []
    for lam in np.linspace(0.0, 1.0, points):
        rm.load_state_dict({k: (1 - lam) * a[k].double() + lam * b[k].double() for k in a})
        accs.append(accuracy(data.margins(ModelReward(rm, tok, batch_size=256))))
    return accs


def barrier(curve: list[float]) -> float:
    """Largest drop of accuracy below the straight line between the two end points."""
    line = np.linspace(curve[0], curve[-1], len(curve))
    return float(np.max(line - np.asarray(curve)))


# ---------------------------------------------------------------------------------------
# One seed
# ---------------------------------------------------------------------------------------


def run_flip(seed: int, flip: float, out: Path, world_clean: Path, sft: Path, sft_other: Path, pool,
             gold: np.ndarray, s: Settings, log) -> dict:
    from lmlab.merge import warm_average
    from lmlab.rewards import ModelReward
    from lmlab.rewards.best_of_n import expected_best_of_n, powers_of_two, score_pool
    from lmlab.train.rl import best_of_n_kl

    noisy = export_noisy(seed, out.parent, s, flip) if flip else world_clean
    prefs = noisy / "preferences_train.jsonl"
    t0 = time.perf_counter()
    probe = train_rm(sft, prefs, out / "probe", "head", s.probe_steps, 1e-2, seed, s)
    members = [train_rm(probe, prefs, out / f"m{i}", "full", s.rm_steps, s.lrs[i % len(s.lrs)], seed * 100 + i, s)
               for i in range(s.members)]
    probe_other = train_rm(sft_other, prefs, out / "other-probe", "head", s.probe_steps, 1e-2, seed, s)
    other = train_rm(probe_other, prefs, out / "other-m0", "full", s.rm_steps, s.lrs[0], seed * 100, s)
    member_sets = {"": members}
    if s.baklava:
        member_sets["bkl_"] = baklava_members(seed, sft, prefs, out / "baklava", s)
    log(f"  flip {flip:g}: probe + {s.members} members + other-init member"
        f"{' + Baklava members' if s.baklava else ''} trained in {time.perf_counter() - t0:.0f} s")
    sets = eval_sets(noisy, world_clean)

    rows: dict[str, dict] = {}
    bon_scores = {}
    for prefix, dirs in member_sets.items():
        rewards = [ModelReward.from_dir(m, batch_size=256) for m in dirs]
        margins = {name: np.stack([d.margins(r) for r in rewards]) for name, d in sets.items()}  # (M, pairs)
        pool_scores = np.stack([score_pool(pool, r) for r in rewards])  # (M, P, N)
        for i in range(s.members):
            rows[f"{prefix}member{i}"] = {k: accuracy(v[i]) for k, v in margins.items()}
        best = int(np.argmax([rows[f"{prefix}member{i}"]["val"] for i in range(s.members)]))
        rows[f"{prefix}single_best"] = {**rows[f"{prefix}member{best}"], "member": best}
        rows[f"{prefix}single_mean"] = {k: statistics.fmean(rows[f"{prefix}member{i}"][k] for i in range(s.members))
                                        if rows[f"{prefix}member0"][k] is not None else None for k in margins}
        bon_scores[f"{prefix}single"] = pool_scores[best]
        for m in s.ms:
            # ENS-M: the mean of the members' scores (EnsembleReward mode "mean") on each pair's two sides.
            rows[f"{prefix}ens{m}"] = {k: accuracy(v[:m].mean(0)) for k, v in margins.items()}
            warm_dir = out / f"{prefix}warm{m}"
            if not (warm_dir / "config.json").is_file():
                warm_average(dirs[:m], warm_dir)
            warm = ModelReward.from_dir(warm_dir, batch_size=256)
            rows[f"{prefix}warm{m}"] = {k: accuracy(d.margins(warm)) for k, d in sets.items()}
            if m == max(s.ms):
                bon_scores[f"{prefix}ens{m}"] = pool_scores[:m].mean(0)
                bon_scores[f"{prefix}warm{m}"] = score_pool(pool, warm)
    bon_scores["gold_oracle"] = gold
    ns = powers_of_two(pool.n)
    bon = {name: [{"n": n, "kl": best_of_n_kl(n), "gold": g,
                   "proxy": p} for n, g, p in zip(ns, expected_best_of_n(sc, gold, ns).values(),
                                                   expected_best_of_n(sc, sc, ns).values())]
           for name, sc in bon_scores.items()}
    lmc = {"shared_init": interpolation_curve(members[0], members[1], sets["id"], s.lmc_points),
           "different_init": interpolation_curve(members[0], other, sets["id"], s.lmc_points)}
    if s.baklava:
        bkl = member_sets["bkl_"]
        lmc["baklava"] = interpolation_curve(bkl[0], bkl[-1], sets["id"], s.lmc_points)
    lmc["barrier"] = {k: barrier(v) for k, v in list(lmc.items())}
    return {"seed": seed, "flip_rate": flip, "n_flipped": len(sets["memorised"].prompts),
            "n_train": len(sets["train_noisy"].prompts), "accuracy": rows, "lmc": lmc, "best_of_n": bon,
            "lrs": [s.lrs[i % len(s.lrs)] for i in range(s.members)]}


def baklava_members(seed: int, sft: Path, prefs: Path, out: Path, s: Settings) -> list[Path]:
    """The same M fine-tunes (learning rates, data-order seeds, steps) as the shared-init
    members, member k starting from one of the SFT run's step checkpoints with the probe's
    head (a probe trained exactly as the shared one: same steps, lr and seed)."""
    from lmlab.rewards.members import baklava_starts, train_members
    from lmlab.rewards.train import RewardConfig
    from lmlab.train.config import TrainConfig

    def cfg(method: str, steps: int, lr: float, train_seed: int) -> RewardConfig:
        train = TrainConfig(steps=steps, batch_size=s.rm_batch, lr=lr, warmup_steps=min(10, steps // 5),
                            weight_decay=0.0, precision="float32", progress=False, log_every=1000, seed=train_seed)
        return RewardConfig(method=method, train=train, eval_batch_size=256)

    members = [cfg("full", s.rm_steps, s.lrs[i % len(s.lrs)], seed * 100 + i) for i in range(s.members)]
    starts = baklava_starts(sft.parent / "checkpoints", s.members)
    return train_members(sft, prefs, out, cfg("head", s.probe_steps, 1e-2, seed), members, starts, resume=True,
                         log=quiet).models


def run_seed(seed: int, out: Path, s: Settings, log) -> list[dict]:
    """One seed's results, cached in its directory (`seed_results.json`, reused only with
    the same settings), so seeds can run in separate processes and be reported together."""
    cache = out / "seed_results.json"
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved["settings"] == json.loads(json.dumps(asdict(s))):
            log(f"seed {seed}: results reused from {cache}")
            return saved["results"]
    results = compute_seed(seed, out, s, log)
    write_json_atomic(cache, {"settings": asdict(s), "results": results})
    return results


def compute_seed(seed: int, out: Path, s: Settings, log) -> list[dict]:
    from lmlab.hub import load_model
    from lmlab.rewards.best_of_n import SamplePool, gold_pool, sample_pool
    from lmlab.tokenizer import Tokenizer

    t0 = time.perf_counter()
    world, sft, sft_other = build_bases(seed, out, s)
    log(f"seed {seed}: bases in {time.perf_counter() - t0:.0f} s")
    prompts = [json.loads(line)["prompt"] for line in (world / "eval.jsonl").read_text().splitlines()]
    policy, tok = load_model(sft), Tokenizer.load(sft)
    pool = sample_pool(policy, tok, prompts[:s.bon_prompts], s.n_max, s.max_new_tokens,
                       temperature=s.temperature, seed=seed, batch_rows=2048)
    # A reward model cannot score an empty answer (it ranks last in best-of-N, at -inf); the
    # curves average over the prompts none of whose samples is empty, so every reward's
    # expected score is finite.
    full = [i for i, row in enumerate(pool.answers) if all(a.strip() for a in row)]
    pool = SamplePool([pool.prompts[i] for i in full], [pool.answers[i] for i in full],
                      [pool.finish_reasons[i] for i in full])
    gold = gold_pool(pool)
    log(f"seed {seed}: {s.n_max} samples x {len(pool.prompts)} prompts ({s.bon_prompts - len(full)} with an "
        f"empty sample left out), mean gold {gold.mean():.3f}")
    return [run_flip(seed, flip, out / f"flip{flip:g}", world, sft, sft_other, pool, gold, s, log)
            for flip in s.flip_rates]


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

COLUMNS = ("train_noisy", "memorised", "train_clean", "id", "ood")


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def rm_names(s: Settings) -> list[str]:
    names = ["single_best", "single_mean"] + [f"{k}{m}" for m in s.ms for k in ("ens", "warm")]
    return names + ([f"bkl_{n}" for n in names] if s.baklava else [])


def accuracy_table(results: list[dict], s: Settings) -> list[str]:
    lines = []
    for flip in s.flip_rates:
        rs = [r for r in results if r["flip_rate"] == flip]
        lines += [f"### {flip:.0%} flipped labels", "",
                  "| reward | seed | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
        for name in rm_names(s):
            for r in rs:
                row = r["accuracy"][name]
                lines.append(f"| {name} | {r['seed']} | " + " | ".join(_f(row[c]) for c in COLUMNS) + " |")
            means = [[r["accuracy"][name][c] for r in rs] for c in COLUMNS]
            lines.append(f"| **{name}** | mean | " + " | ".join(
                _f(statistics.fmean(v)) if None not in v else "-" for v in means) + " |")
        lines.append("")
    return lines


def lmc_table(results: list[dict], s: Settings) -> list[str]:
    lams = np.linspace(0, 1, s.lmc_points)
    lines = ["| flip | seed | pair | " + " | ".join(f"λ={x:.1f}" for x in lams) + " | barrier |",
             "|---|---|---|" + "---|" * (len(lams) + 1)]
    for r in results:
        for pair in (p for p in ("shared_init", "different_init", "baklava") if p in r["lmc"]):
            lines.append(f"| {r['flip_rate']:.0%} | {r['seed']} | {pair} | "
                         + " | ".join(_f(x) for x in r["lmc"][pair]) + f" | {_f(r['lmc']['barrier'][pair])} |")
    return lines


def bon_table(results: list[dict]) -> list[str]:
    names = list(results[0]["best_of_n"])
    ns = [p["n"] for p in results[0]["best_of_n"][names[0]]]
    lines = ["| flip | seed | reward (gold of best-of-n) | " + " | ".join(f"n={n}" for n in ns) + " |",
             "|---|---|---|" + "---|" * len(ns)]
    lines.insert(0, "KL(best-of-n ‖ policy) = " + ", ".join(
        f"{p['kl']:.2f} (n={p['n']})" for p in results[0]["best_of_n"][names[0]]))
    lines.insert(1, "")
    for r in results:
        for name in names:
            lines.append(f"| {r['flip_rate']:.0%} | {r['seed']} | {name} | "
                         + " | ".join(f"{p['gold']:.3f}" for p in r["best_of_n"][name]) + " |")
    for flip in sorted({r["flip_rate"] for r in results}):
        rs = [r for r in results if r["flip_rate"] == flip]
        for name in names:
            vals = np.mean([[p["gold"] for p in r["best_of_n"][name]] for r in rs], axis=0)
            lines.append(f"| {flip:.0%} | mean | **{name}** | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    return lines


def plots(results: list[dict], s: Settings, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmlab.io import atomic_path

    written = []
    flips = list(s.flip_rates)
    fig, axes = plt.subplots(2, len(flips), figsize=(5.5 * len(flips), 7), squeeze=False)
    for col, flip in enumerate(flips):
        rs = [r for r in results if r["flip_rate"] == flip]
        styles = [("single", "o-"), (f"ens{max(s.ms)}", "s-"), (f"warm{max(s.ms)}", "^-"), ("gold_oracle", "k:")]
        if s.baklava:
            styles.insert(3, (f"bkl_warm{max(s.ms)}", "v--"))
        for name, style in styles:
            kl = [p["kl"] for p in rs[0]["best_of_n"][name]]
            gold = np.mean([[p["gold"] for p in r["best_of_n"][name]] for r in rs], axis=0)
            axes[0][col].plot(kl, gold, style, label=name)
            if name != "gold_oracle":
                proxy = np.mean([[p["proxy"] for p in r["best_of_n"][name]] for r in rs], axis=0)
                axes[1][col].plot(kl, proxy - proxy[0], style, label=name)
        axes[0][col].set_title(f"{flip:.0%} flipped labels: gold reward of best-of-n")
        axes[1][col].set_title("proxy reward of best-of-n (minus n=1)")
        for ax in axes[:, col]:
            ax.set_xlabel("KL(best-of-n || policy) [nats]")
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "best_of_n.png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    written.append(out / "best_of_n.png")

    fig, axes = plt.subplots(1, len(flips), figsize=(5.5 * len(flips), 3.8), squeeze=False)
    lams = np.linspace(0, 1, s.lmc_points)
    for col, flip in enumerate(flips):
        for r in (r for r in results if r["flip_rate"] == flip):
            axes[0][col].plot(lams, r["lmc"]["shared_init"], "b-", alpha=0.7,
                              label="shared init" if r is results[0] or r["seed"] == results[0]["seed"] else None)
            axes[0][col].plot(lams, r["lmc"]["different_init"], "r--", alpha=0.7,
                              label="different init" if r["seed"] == results[0]["seed"] else None)
            if "baklava" in r["lmc"]:
                axes[0][col].plot(lams, r["lmc"]["baklava"], "g-.", alpha=0.7,
                                  label="Baklava (first vs last start)" if r["seed"] == results[0]["seed"] else None)
        axes[0][col].set_title(f"{flip:.0%} flipped: ID accuracy along (1-λ)A + λB")
        axes[0][col].set_xlabel("λ")
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "lmc.png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    written.append(out / "lmc.png")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/warm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--quick", action="store_true", help="a toy configuration (for the test): seconds")
    parser.add_argument("--members", type=int, help="reward models per flip rate (default 10; 3 with --quick)")
    parser.add_argument("--n-max", type=int, help="samples per prompt for best-of-n (default 256)")
    parser.add_argument("--baklava", action="store_true",
                        help="add Baklava's member set (members from different SFT checkpoints): rows bkl_*")
    parser.add_argument("--flips", type=float, nargs="+", help="flip rates (default 0 0.25)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else Settings()
    if args.baklava:
        s = replace(s, baklava=True)
    if args.flips:
        s = replace(s, flip_rates=tuple(args.flips))
    if args.members:
        s = replace(s, members=args.members, ms=tuple(m for m in s.ms if m <= args.members) or (args.members,))
    if args.n_max:
        s = replace(s, n_max=args.n_max)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Tiny models gain nothing from a second thread, and on a shared machine its spin-waits cost a lot.
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = []
    for seed in args.seeds:
        results += run_seed(seed, out / f"seed{seed}", s, print)
    seconds = time.perf_counter() - t0
    write_json_atomic(out / "results.json", {"settings": asdict(s), "seeds": args.seeds, "seconds": seconds,
                                             "results": results})
    md = [f"# WARM vs ENS vs single RM on SortWorld (seeds {args.seeds}, {seconds:.0f} s)", "",
          "## Pairwise accuracy", "", *accuracy_table(results, s),
          "## Linear mode connectivity (ID accuracy)", "", *lmc_table(results, s), "",
          "## Best-of-n: expected gold reward of the proxy's choice", "", *bon_table(results), ""]
    write_text_atomic(out / "details.md", "\n".join(md))
    figures = [f.name for f in plots(results, s, out)]
    write_unified(out, results, s, figures, argv)
    print("\n".join(md))
    return 0


CLAIM = ("Ramé et al. 2024 (WARM)", "Under label noise a weight-averaged reward model (WARM) beats the prediction "
         "ensemble of the same members (ENS), which beats a single reward model, in and out of distribution.",
         "WARM more robust than ENS and a single RM under 25% label corruption; WARM memorises fewer corrupted labels")


def verdict(rows: list[dict], m: int, flip: float) -> str:
    """The paper's ordering WARM > ENS > single on clean-label and OOD accuracy at the
    noisiest flip rate, from the rows' seed means."""
    at = f" @ {flip:.0%} flipped"

    def mean(arm, metric):
        xs = [r[metric] for r in rows if r["arm"] == arm + at and r.get(metric) is not None]
        return statistics.fmean(xs) if xs else None

    parts, holds = [], []
    for metric in ("train_clean", "ood"):
        w, e, single = mean(f"warm{m}", metric), mean(f"ens{m}", metric), mean("single_best", metric)
        if None in (w, e, single):
            continue
        holds.append(w > e > single)
        parts.append(f"{metric}: WARM-{m} {w:.3f}, ENS-{m} {e:.3f}, single {single:.3f}")
    if not holds:
        return "not measured: no noisy flip rate in this run"
    seeds = len({r["seed"] for r in rows})
    word = "reproduced" if all(holds) else "partly reproduced" if any(holds) else "not reproduced"
    return f"{word} at {flip:.0%} flipped labels ({seeds} seeds; ordering WARM > ENS > single): " + "; ".join(parts)


def write_unified(out: Path, results: list[dict], s: Settings, figures: list[str], argv) -> None:
    from lmlab.report.results import Claim, command_line, write_results

    m = max(s.ms)
    arms = ["single_best", *(f"{k}{mm}" for mm in s.ms for k in ("ens", "warm"))]
    arms += [f"bkl_{a}" for a in arms] if s.baklava else []
    rows = [{"arm": f"{name} @ {r['flip_rate']:.0%} flipped", "seed": r["seed"],
             **{c: r["accuracy"][name][c] for c in COLUMNS}}
            for r in results for name in arms if name in r["accuracy"]]
    noisy = max(s.flip_rates)
    write_results(out, name="warm", title="WARM vs ENS vs a single reward model on SortWorld",
                  claim=Claim(*CLAIM), command=command_line(__file__, argv), metrics=list(COLUMNS), rows=rows,
                  verdict=verdict(rows, m, noisy),
                  notes="Pairwise accuracy against the gold reward's order (ties count half). `memorised`: the "
                        "flipped training pairs scored against their flipped label (lower is better). Best-of-n "
                        "and mode-connectivity tables are in details.md.", figures=figures)


if __name__ == "__main__":
    sys.exit(main())
