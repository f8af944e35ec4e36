"""Stage `warm`: WARM and ENS over the reward stage's members -> warm/model (the uniform or
weighted average of the members' weights, `lmlab.merge.warm_average`) and
warm/warm_report.json: the accuracy of every member (from reward_report.json), the best
and mean member, ENS (`EnsembleReward`: the members' scores averaged, or mean - k*std)
and WARM on the reward stage's evaluation sets (clean and noisy training pairs, held-out
pairs in and out of distribution)."""
from __future__ import annotations

from dataclasses import dataclass

from lmlab.errors import LmlabError

NEEDS = ("reward", "world")
SECTIONS = ("warm", "reward", "world")
REPORT = "warm_report.json"


@dataclass(frozen=True)
class WarmConfig:
    weights: tuple[float, ...] = ()  # one per member, normalised to sum 1; empty: uniform
    ens_mode: str = "mean"  # mean | mean_minus_std
    ens_k: float = 1.0  # mean_minus_std: how many member standard deviations to subtract

    def __post_init__(self) -> None:
        from lmlab.rewards.base import ENSEMBLE_MODES

        if self.ens_mode not in ENSEMBLE_MODES:
            raise LmlabError(f"warm.ens_mode must be one of {', '.join(ENSEMBLE_MODES)}, got {self.ens_mode!r}")
        if self.ens_k < 0:
            raise LmlabError(f"warm.ens_k must be >= 0, got {self.ens_k}")


CONFIG = ("warm", WarmConfig)


def cost(recipe) -> float:
    from lmlab.stages.common import FORWARD, PAIR_TOKENS

    r = recipe.reward
    return (r.members + 1) * 4 * (r.eval_pairs or 300) * PAIR_TOKENS * FORWARD  # ENS and WARM, 4 sets


def run(ctx) -> None:
    import json

    from lmlab.io import write_json_atomic
    from lmlab.merge import warm_average
    from lmlab.rewards.accuracy import accuracies
    from lmlab.rewards.base import EnsembleReward, ModelReward
    from lmlab.stages.common import preference_eval_sets, require

    cfg, rcfg = ctx.recipe.warm, ctx.recipe.reward
    reward = require(ctx.input("reward"), "reward")
    trained = json.loads(require(reward / "reward_report.json", "reward").read_text(encoding="utf-8"))
    members = trained["members"]
    if len(members) < 2:
        raise LmlabError(f"WARM and ENS need at least 2 reward models; the reward stage trained {len(members)}: "
                         "set reward.members to 2 or more")
    if cfg.weights and len(cfg.weights) != len(members):
        raise LmlabError(f"warm.weights has {len(cfg.weights)} entries for {len(members)} members; give one per "
                         "member or none")
    dirs = [require(reward / m["model"], "reward") for m in members]
    out = ctx.out / "model"
    if ctx.resume and (out / "config.json").is_file():
        ctx.echo(f"warm: reusing {out}")  # warm_average renames it into place complete
    else:
        warm_average(dirs, out, weights=list(cfg.weights) or None)
        ctx.echo(f"warm: averaged {len(dirs)} members -> {out}")

    sets, _ = preference_eval_sets(ctx.run_dir, ctx.recipe.world, rcfg.eval_pairs)
    if {k: len(v) for k, v in sets.items()} != trained["sets"]:
        raise LmlabError("the reward stage evaluated on other pairs than this run's world gives now; rerun it "
                         "(`lmlab run --from reward --run-dir ...`)")
    device, batch = rcfg.train.device, rcfg.eval_batch_size
    ens = EnsembleReward([ModelReward.from_dir(d, batch_size=batch, device=device) for d in dirs],
                         mode=cfg.ens_mode, k=cfg.ens_k)
    results = {"ens": accuracies(ens, sets),
               "warm": accuracies(ModelReward.from_dir(out, batch_size=batch, device=device), sets)}
    singles = [m["accuracy"] for m in members]
    # "Best" is the member with the highest in-distribution held-out accuracy (else clean
    # training accuracy): the one a practitioner would pick.
    pick = "test_id" if "test_id" in sets else "train_clean"
    best = max(range(len(members)), key=lambda i: singles[i][pick])
    report = {
        "members": len(members), "weights": list(cfg.weights) or None, "ens_mode": cfg.ens_mode,
        "ens_k": cfg.ens_k if cfg.ens_mode == "mean_minus_std" else None, "flip_rate": trained["flip_rate"],
        "sets": trained["sets"],
        "accuracy": {
            "best_single": {"member": members[best]["name"], "chosen_by": pick, **singles[best]},
            "mean_single": {k: sum(s[k] for s in singles) / len(singles) for k in sets},
            "ens": results["ens"], "warm": results["warm"],
        },
        "model": "model",
    }
    write_json_atomic(ctx.out / REPORT, report)
    rows = ["| model | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for name, acc in report["accuracy"].items():
        rows.append(f"| {name} | " + " | ".join(f"{acc[k]:.3f}" for k in sets) + " |")
    ctx.echo("\n".join(rows))
