"""PPO against WARM vs PPO against the best single reward model under 25% flipped labels
(Ramé et al. 2024: the WARM policy wins 79.4% of gold comparisons), one command:

    python experiments/warm_ppo.py --out runs/warm-ppo --seeds 0 1 2 [--quick] [--no-baklava]

Per seed:
1. SortWorld (1200 SFT prompts) and a small chat model pretrained and LoRA-SFT'd on it (the
   `lmlab.pipeline` stages tokenizer -> shards -> pretrain -> world -> sft), the SFT run
   keeping a step checkpoint every `sft_checkpoint_every` steps;
2. the world exported again with the noisy labeller flipping 25% of its label draws: the
   reward models' training pairs;
3. WARM's members (`lmlab.rewards.members.train_members`): a linear probe on the final SFT
   model, then M full fine-tunes from it, diverse in learning rate and data order; WARM-M =
   `lmlab.merge.warm_average` of them; the single best member is the one with the best
   accuracy on the first half of the held-out in-distribution pairs (clean labels), as in
   experiments/warm.py. Also (unless --no-baklava) Baklava's members: the same M fine-tunes,
   each starting from a different step checkpoint of the SFT run with the probe's head,
   and their WARM-M;
4. PPO (`lmlab.align.online.align_online`, method ppo, reward kind model) from one SFT
   policy -- the SFT run's step-`policy_step` checkpoint, an under-trained policy that
   leaves PPO room -- against each reward: (a) the single best RM, (b) WARM-M, (c) Baklava
   WARM-M; the same rollout seed for every arm, KL to the start policy in the reward, no
   EMA reference (the anchor stays the SFT policy, as in KL-regularised RLHF);
5. judged on the world's held-out prompts by the gold reward: the win rate of each WARM
   policy against the single-RM policy (`lmlab.eval.win_rate`, ties count half), greedy and
   sampled at temperature 1, after the last rollout (the headline) and at every
   `win_every`-th rollout's checkpoint (the win rate over training); and the gold-vs-proxy
   curve over PPO's rollouts (the `reward` and `gold` columns of each run's metrics.jsonl:
   reward hacking is the proxy rising while the gold reward stalls or falls).

Writes, under --out: results.json (everything, per seed), experiment.json + results.md
(`lmlab.report.results.write_results`: every seed and the mean per arm), warm_ppo.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lmlab.io import write_json_atomic


# The packaged short recipe under the overrides below; the default one runs the whole
# lifecycle with a noisy world, and this experiment's world stage must export clean labels.
RECIPE = "quick"

@dataclass(frozen=True)
class Settings:
    world_n: int = 1200
    vocab: int = 384
    model: str = "{preset: nano, n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 2, ffn_hidden: 172, max_seq_len: 64}"
    pretrain_steps: int = 250
    sft_steps: int = 80
    sft_checkpoint_every: int = 10
    policy_step: int = 40  # the SFT checkpoint PPO starts from
    flip_rate: float = 0.25
    probe_steps: int = 60
    rm_steps: int = 250
    rm_batch: int = 16
    members: int = 6
    lrs: tuple[float, ...] = (1e-3, 3e-4, 2e-3, 5e-4, 1.5e-3, 7e-4, 1e-3, 3e-4, 2e-3, 5e-4)
    baklava: bool = True
    iterations: int = 80  # PPO rollouts
    rollout_prompts: int = 16
    group_size: int = 4
    max_new_tokens: int = 16
    ppo_lr: float = 1e-3
    kl_coef: float = 0.05
    empty_score: float = -2.0  # a reward model cannot read an empty answer: it gets this score
    eval_n: int = 120  # held-out prompts
    win_samples: int = 4  # sampled answers per held-out prompt for the sampled win rate
    win_every: int = 20  # PPO keeps a checkpoint every this many rollouts: the win rate over training
    smooth: int = 5  # rollouts in the plot's moving average


QUICK = Settings(world_n=40, vocab=300, pretrain_steps=4, sft_steps=4, sft_checkpoint_every=2, policy_step=2,
                 probe_steps=3, rm_steps=3, rm_batch=4, members=2, iterations=4, rollout_prompts=4, group_size=2,
                 max_new_tokens=8, eval_n=8, win_samples=2, win_every=2, smooth=2)

ARMS = {"single": "single best RM", "warm": "WARM", "baklava": "Baklava WARM"}
CLAIM = "a policy RL-trained against WARM wins 79.4% of gold-reward comparisons against one trained against a single RM"


def quiet(*_):
    pass


# ---------------------------------------------------------------------------------------
# Base model, noisy pairs, reward models
# ---------------------------------------------------------------------------------------


def warm_experiment():
    """experiments/warm.py as a module (its base-run overrides are this experiment's too)."""
    import importlib.util

    name = "lmlab_experiment_warm"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("warm.py"))
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def build_base(seed: int, out: Path, s: Settings) -> Path:
    """The run directory holding world/ and sft/ (with its step checkpoints)."""
    from lmlab.pipeline import load_recipe, run_pipeline
    from lmlab.worlds.export import export_world

    corpus_world = out / "world-corpus"
    if not (corpus_world / "world.json").is_file():
        export_world("sort", corpus_world, seed=seed, n=s.world_n)
    sets = warm_experiment().base_overrides(seed, s, corpus_world, f"warm-ppo-base-{seed}")
    recipe, raw = load_recipe(RECIPE, sets)
    run = out / "base"
    if not (run / "sft" / "stage.json").is_file():
        run_pipeline(recipe, run, raw=raw, echo=quiet, resume=run.exists())
    return run


def reward_configs(seed: int, s: Settings):
    from lmlab.rewards.train import RewardConfig
    from lmlab.train.config import TrainConfig

    def cfg(method: str, steps: int, lr: float, train_seed: int) -> RewardConfig:
        train = TrainConfig(steps=steps, batch_size=s.rm_batch, lr=lr, warmup_steps=min(10, steps // 5),
                            weight_decay=0.0, precision="float32", progress=False, log_every=1000, seed=train_seed)
        return RewardConfig(method=method, train=train, eval_batch_size=256)

    probe = cfg("head", s.probe_steps, 1e-2, seed)
    return probe, [cfg("full", s.rm_steps, s.lrs[i % len(s.lrs)], seed * 100 + i) for i in range(s.members)]


def held_out_pairs(world: Path) -> dict[str, list]:
    """The clean labeller's held-out pairs: `val` (first half of the in-distribution test
    pairs: picks the single best RM), `id` (second half) and `ood` (a hot sampler on
    unseen prompts). Pairs with an empty side cannot be scored by an RM and are left out."""
    from lmlab.data.preference import read_preference_jsonl

    def pairs(split: str):
        return [p for p in read_preference_jsonl(world / f"preferences_{split}.jsonl").pairs
                if p.chosen.strip() and p.rejected.strip()]

    test = pairs("test_id")
    half = len(test) // 2
    return {"val": test[:half], "id": test[half:], "ood": pairs("test_ood")}


def reward_models(seed: int, out: Path, run: Path, s: Settings, log) -> dict:
    """Train both member sets, average each, pick the best single member; their accuracies."""
    from lmlab.merge import warm_average
    from lmlab.rewards import ModelReward
    from lmlab.rewards.accuracy import accuracies
    from lmlab.rewards.members import baklava_starts, train_members
    from lmlab.worlds.export import export_world
    from lmlab.worlds.labeller import LabellerConfig

    noisy = out / f"world-flip{s.flip_rate:g}"
    if not (noisy / "world.json").is_file():
        export_world("sort", noisy, seed=seed, n=s.world_n, labeller=LabellerConfig(flip_rate=s.flip_rate))
    prefs = noisy / "preferences_train.jsonl"
    probe, members = reward_configs(seed, s)
    sft = run / "sft" / "model"
    sets = held_out_pairs(run / "world")  # the clean export: same prompts and pairs, clean labels

    def score(path: Path) -> dict:
        return accuracies(ModelReward.from_dir(path, batch_size=256), sets)

    kinds = {"shared": None}
    if s.baklava:
        kinds["baklava"] = baklava_starts(run / "sft" / "checkpoints", s.members)
    result = {}
    for kind, starts in kinds.items():
        t0 = time.perf_counter()
        trained = train_members(sft, prefs, out / f"rm-{kind}", probe, members, starts, resume=True, log=quiet)
        warm = out / f"rm-{kind}" / "warm"
        if not (warm / "config.json").is_file():
            warm_average(trained.models, warm)
        accs = [score(m) for m in trained.models]
        best = max(range(len(accs)), key=lambda i: accs[i]["val"])
        result[kind] = {"members": [str(m) for m in trained.models], "starts": [p.name for p in trained.starts],
                        "member_accuracy": accs, "best": best, "warm": str(warm), "warm_accuracy": score(warm)}
        log(f"  {kind}: {len(members)} members in {time.perf_counter() - t0:.0f} s; ID/OOD accuracy best single "
            f"{accs[best]['id']:.3f}/{accs[best]['ood']:.3f}, WARM-{len(members)} "
            f"{result[kind]['warm_accuracy']['id']:.3f}/{result[kind]['warm_accuracy']['ood']:.3f}")
    return result


# ---------------------------------------------------------------------------------------
# PPO and its judgement
# ---------------------------------------------------------------------------------------


def ppo_config(run: Path, reward_dir: str, seed: int, s: Settings):
    from lmlab.align.online import OnlineRLConfig, RewardSpec
    from lmlab.train.objectives.ppo import PPOConfig
    from lmlab.train.rollout import RolloutConfig

    base = OnlineRLConfig(
        method="ppo", policy=str(policy_dir(run, s)), prompts=str(run / "world" / "sft.jsonl"),
        eval_prompts=str(run / "world" / "eval.jsonl"), eval_n=s.eval_n, iterations=s.iterations,
        rollout=RolloutConfig(prompts=s.rollout_prompts, group_size=s.group_size, max_new_tokens=s.max_new_tokens,
                              seed=seed, empty_score=s.empty_score),
        reward=RewardSpec(kind="model", paths=(reward_dir,), batch_size=256),
        ppo=replace(PPOConfig(), ema=False, kl_coef=s.kl_coef))
    return replace(base, train=replace(base.train, lr=s.ppo_lr, seed=seed, progress=False, precision="float32",
                                       log_every=1, checkpoint_every=s.win_every, keep_checkpoints=0))


def policy_dir(run: Path, s: Settings) -> Path:
    path = run / "sft" / "checkpoints" / f"step-{s.policy_step}"
    if not (path / "config.json").is_file():
        raise SystemExit(f"no SFT checkpoint {path}: policy_step must be a multiple of sft_checkpoint_every")
    return path


def curve(run_dir: Path) -> list[dict]:
    """Per rollout: the proxy reward PPO maximised, the gold reward of the same samples,
    the KL to the start policy, the answer length (metrics.jsonl, one optimizer step per rollout)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [{"iteration": r["step"], "proxy": r["reward"], "gold": r["gold"], "kl": r.get("kl"),
             "length": r.get("length")} for r in rows if "reward" in r and "gold" in r]


def win_rates(a: Path, b: Path, prompts: list[str], seed: int, s: Settings) -> dict:
    """Policy a's gold win rate against b, greedy and sampled (both policies draw with one seed)."""
    from lmlab.eval.win_rate import Policy, win_rate
    from lmlab.rewards import GoldReward

    gold = GoldReward("sort", "dense")
    pa, pb = Policy.from_dir(a), Policy.from_dir(b)
    pa.name, pb.name = a.parent.name, b.parent.name
    greedy = win_rate(pa, pb, prompts, gold, max_new_tokens=s.max_new_tokens)
    sampled = win_rate(pa, pb, prompts * s.win_samples, gold, max_new_tokens=s.max_new_tokens, temperature=1.0,
                       seed=seed)
    return {"greedy": {k: v for k, v in greedy.items() if k != "examples"},
            "sampled": {k: v for k, v in sampled.items() if k != "examples"}, "examples": greedy["examples"]}


def compute_seed(seed: int, out: Path, s: Settings, log) -> dict:
    from lmlab.align.online import align_online
    from lmlab.data.chat import read_prompts

    t0 = time.perf_counter()
    run = build_base(seed, out, s)
    log(f"seed {seed}: base in {time.perf_counter() - t0:.0f} s")
    rms = reward_models(seed, out, run, s, log)
    rewards = {"single": rms["shared"]["members"][rms["shared"]["best"]], "warm": rms["shared"]["warm"]}
    if s.baklava:
        rewards["baklava"] = rms["baklava"]["warm"]
    arms = {}
    for arm, reward_dir in rewards.items():
        where = out / f"ppo-{arm}"
        t1 = time.perf_counter()
        report = align_online(ppo_config(run, reward_dir, seed, s), where, resume="auto", log=quiet).report
        arms[arm] = {"reward": reward_dir, "before": report["before"], "after": report["after"],
                     "seconds": report["seconds"], "curve": curve(where)}
        log(f"  PPO vs {ARMS[arm]}: {time.perf_counter() - t1:.0f} s, held-out greedy gold "
            f"{report['before']['gold_dense']:.3f} -> {report['after']['gold_dense']:.3f}")
    prompts = read_prompts(run / "world" / "eval.jsonl")[:s.eval_n]
    wins = {arm: win_rates(out / f"ppo-{arm}" / "model", out / "ppo-single" / "model", prompts, seed, s)
            for arm in arms if arm != "single"}
    for arm, w in wins.items():
        w["over_training"] = []
        for step in range(s.win_every, s.iterations + 1, s.win_every):
            at = [out / f"ppo-{a}" / "checkpoints" / f"step-{step}" for a in (arm, "single")]
            both = win_rates(*at, prompts, seed, s)
            w["over_training"].append({"iteration": step, "greedy": both["greedy"]["win_rate"],
                                       "sampled": both["sampled"]["win_rate"]})
        log(f"  {ARMS[arm]} policy vs single-RM policy: gold win rate {w['greedy']['win_rate']:.3f} greedy, "
            f"{w['sampled']['win_rate']:.3f} sampled; over training (greedy) "
            + ", ".join(f"{p['iteration']}: {p['greedy']:.3f}" for p in w["over_training"]))
    return {"seed": seed, "rewards": rms, "arms": arms, "win_rates": wins, "seconds": time.perf_counter() - t0}


def run_seed(seed: int, out: Path, s: Settings, log) -> dict:
    """One seed, cached in its directory (`seed_results.json`, reused with the same settings)."""
    cache = out / "seed_results.json"
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved["settings"] == json.loads(json.dumps(asdict(s))):
            log(f"seed {seed}: results reused from {cache}")
            return saved["result"]
    result = compute_seed(seed, out, s, log)
    write_json_atomic(cache, {"settings": asdict(s), "result": result})
    return result


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

METRICS = ["win_rate_vs_single", "win_rate_vs_single_sampled", "gold_dense", "exact_match", "kl_to_sft",
           "rollout_gold_first", "rollout_gold_last", "proxy_gain", "rm_accuracy_id", "rm_accuracy_ood"]


def tail_mean(values: list[float], n: int) -> float:
    return statistics.fmean(values[-n:])


def rows_of(results: list[dict], s: Settings) -> list[dict]:
    """One row per (arm, seed): the judged numbers of the write_results form."""
    rows = []
    tail = max(1, s.iterations // 8)  # the curve's last eighth: rollouts are noisy one by one
    for r in results:
        for arm in (k for k in ARMS if k in r["arms"]):  # JSON sorts the keys: report in ARMS' order
            a = r["arms"][arm]
            rm = r["rewards"]["shared" if arm != "baklava" else "baklava"]
            acc = rm["member_accuracy"][rm["best"]] if arm == "single" else rm["warm_accuracy"]
            win = r["win_rates"].get(arm)
            gold, proxy = [p["gold"] for p in a["curve"]], [p["proxy"] for p in a["curve"]]
            rows.append({"arm": ARMS[arm], "seed": r["seed"],
                         "win_rate_vs_single": win["greedy"]["win_rate"] if win else None,
                         "win_rate_vs_single_sampled": win["sampled"]["win_rate"] if win else None,
                         "gold_dense": a["after"]["gold_dense"], "exact_match": a["after"]["exact_match"],
                         "kl_to_sft": a["after"]["kl_to_sft"], "rollout_gold_first": gold[0],
                         "rollout_gold_last": tail_mean(gold, tail), "proxy_gain": tail_mean(proxy, tail) - proxy[0],
                         "rm_accuracy_id": acc["id"], "rm_accuracy_ood": acc["ood"], "seconds": a["seconds"]})
    return rows


def smooth(values: list[float], k: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def plot(results: list[dict], s: Settings, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmlab.io import atomic_path

    colours = {"single": "tab:red", "warm": "tab:blue", "baklava": "tab:green"}
    arms = [k for k in ARMS if k in results[0]["arms"]]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for arm in arms:
        curves = [r["arms"][arm]["curve"] for r in results]
        its = [p["iteration"] for p in curves[0]]
        for key, ax, shift in (("gold", axes[0], False), ("proxy", axes[1], True)):
            per_seed = []
            for c in curves:
                v = [p[key] for p in c]
                v = [x - v[0] for x in v] if shift else v
                per_seed.append(smooth(v, s.smooth))
                ax.plot(its, per_seed[-1], color=colours[arm], alpha=0.25, lw=0.8)
            mean = [statistics.fmean(col) for col in zip(*per_seed)]
            ax.plot(its, mean, color=colours[arm], lw=2, label=f"PPO vs {ARMS[arm]}")
        for c in curves:
            axes[2].plot(smooth([p["kl"] for p in c], s.smooth), smooth([p["gold"] for p in c], s.smooth),
                         color=colours[arm],
                         alpha=0.6, lw=1, label=f"PPO vs {ARMS[arm]}" if c is curves[0] else None)
    for arm in arms[1:]:
        curves = [r["win_rates"][arm]["over_training"] for r in results]
        its = [p["iteration"] for p in curves[0]]
        for c in curves:
            axes[3].plot(its, [p["greedy"] for p in c], "o-", color=colours[arm], alpha=0.25, lw=0.8)
        for key, style in (("greedy", "o-"), ("sampled", "s--")):
            axes[3].plot(its, [statistics.fmean(col) for col in zip(*[[p[key] for p in c] for c in curves])],
                         style, color=colours[arm], lw=2, label=f"{ARMS[arm]} vs single RM ({key})")
    axes[3].axhline(0.794, color="k", ls=":", lw=1, label="paper: 0.794")
    axes[3].axhline(0.5, color="grey", lw=0.5)
    axes[3].set_title("gold win rate against the single-RM policy")
    axes[3].set_xlabel("PPO iteration (rollout)")
    axes[3].set_ylim(0, 1)
    axes[0].set_title("gold reward of the rollouts (dense)")
    axes[1].set_title("proxy reward (the RM PPO maximises), minus its first value")
    axes[2].set_title("gold reward vs KL to the start policy")
    for ax in axes[:2]:
        ax.set_xlabel("PPO iteration (rollout)")
    axes[2].set_xlabel("KL(policy || start) per answer [nats]")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"{int(s.flip_rate * 100)}% flipped labels; moving average over {s.smooth} rollouts; "
                 f"thin lines: seeds {[r['seed'] for r in results]}", fontsize=9)
    fig.tight_layout()
    path = out / "warm_ppo.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path


def verdict(rows: list[dict]) -> str:
    """The claim judged on the per-seed greedy and sampled win rates of the WARM arm: a
    direction counts only where the mean is 2 standard errors (over seeds) from 1/2."""
    def summary(key: str) -> tuple[float, float, list[float]]:
        vals = [r[key] for r in rows if r["arm"] == ARMS["warm"]]
        sem = statistics.stdev(vals) / len(vals) ** 0.5 if len(vals) > 1 else float("inf")
        return statistics.fmean(vals), sem, vals

    (g, g_sem, gs), (m, m_sem, _) = summary("win_rate_vs_single"), summary("win_rate_vs_single_sampled")
    if g - 2 * g_sem > 0.5 and m - 2 * m_sem > 0.5:
        word = "reproduced" if g + 2 * g_sem >= 0.794 else "direction reproduced, smaller than the paper's"
    elif g + 2 * g_sem < 0.5 and m + 2 * m_sem < 0.5:
        word = "reversed"
    else:
        word = "not reproduced (no consistent winner)"
    return (f"{word}: the WARM policy's gold win rate against the single-RM policy is {g:.3f} ± {g_sem:.3f} greedy "
            f"and {m:.3f} ± {m_sem:.3f} sampled (mean ± standard error over {len(gs)} seeds; greedy per seed "
            f"{', '.join(f'{w:.3f}' for w in gs)}) vs the paper's 0.794")


def write_report(out: Path, results: list[dict], s: Settings, command: str, figure: Path) -> None:
    from lmlab.report.results import Claim, write_results

    rows = rows_of(results, s)
    over = {f"{ARMS[arm]} vs {ARMS['single']}": {r["seed"]: r["win_rates"][arm]["over_training"] for r in results}
            for arm in ARMS if arm != "single" and arm in results[0]["win_rates"]}
    write_results(out, name="warm-ppo", title="PPO against WARM vs against the best single RM (25% flipped labels)",
                  claim=Claim(source="Ramé et al. 2024 (WARM)", statement=CLAIM, paper_figure="79.4% win rate"),
                  command=command, metrics=METRICS + ["seconds"], rows=rows, verdict=verdict(rows),
                  notes=notes(s), figures=[figure.name],
                  extra={"win_rate_over_training": over, "settings": asdict(s)})


def notes(s: Settings) -> str:
    return (f"SortWorld, {s.members} reward models per member set trained on pairs with {s.flip_rate:.0%} of the "
            f"labeller's draws flipped; PPO {s.iterations} rollouts of {s.rollout_prompts} prompts x {s.group_size} "
            f"samples from the SFT run's step-{s.policy_step} checkpoint, lr {s.ppo_lr:g}, KL {s.kl_coef:g} (k1, in "
            f"the reward), no EMA reference. Win rates: {s.eval_n} held-out prompts judged by the dense gold reward, "
            f"ties count half; sampled: {s.win_samples} answers per prompt at temperature 1. rollout_gold_*, "
            "proxy_gain: the training rollouts' mean gold reward at the first rollout and over the last eighth, and "
            "the proxy's rise over the same span (RM scales differ, so proxy gains compare shapes, not sizes).")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/warm-ppo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--quick", action="store_true", help="a toy configuration (for the test): seconds")
    parser.add_argument("--no-baklava", action="store_true", help="leave out the Baklava WARM arm")
    parser.add_argument("--iterations", type=int, help="PPO rollouts per arm (default 80)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else Settings()
    if args.no_baklava:
        s = replace(s, baklava=False)
    if args.iterations:
        s = replace(s, iterations=args.iterations)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Tiny models gain nothing from a second thread, and on a shared machine its spin-waits cost a lot.
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = [run_seed(seed, out / f"seed{seed}", s, print) for seed in args.seeds]
    seconds = time.perf_counter() - t0
    write_json_atomic(out / "results.json", {"settings": asdict(s), "seeds": args.seeds, "seconds": seconds,
                                             "results": results})
    figure = plot(results, s, out)
    command = "python experiments/warm_ppo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(out, results, s, command, figure)
    print(verdict(rows_of(results, s)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
