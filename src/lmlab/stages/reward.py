"""Stage `reward`: M reward models from ONE shared initialisation, as WARM prescribes
(Ramé et al. 2024): a linear probe on the SFT model first (`lmlab.rewards.train`, method
"head": only the score head trains), then each member fine-tuned from the probe (LoRA,
DoRA or full) with its own learning rate and seed (data order, adapter init) -- or, with
`init: baklava`, from different step checkpoints of the sft stage's run (sft/checkpoints/,
spread over the run; each trunk gets the probe's head; lmlab.rewards.members) -> reward/
probe/, reward/member-<k>/ (each a `train_reward_model` run directory with model/) and
reward/reward_report.json: every model's accuracy on the world's training pairs whose label
the gold reward confirms (clean) or contradicts (noisy), and on the held-out pairs in and
out of distribution, oriented by the gold reward (lmlab.rewards.accuracy).

The labels come from the world stage's labeller; `world.flip_rate` sets their noise."""
from __future__ import annotations

from dataclasses import dataclass, field

from lmlab.adapters.inject import AdapterConfig
from lmlab.data.preference import PreferenceDataConfig
from lmlab.errors import LmlabError
from lmlab.train.config import TrainConfig

NEEDS = ("sft", "world")
SECTIONS = ("reward", "world")
REPORT = "reward_report.json"
MEMBER_METHODS = ("lora", "dora", "full")


def _probe_train() -> TrainConfig:
    return TrainConfig(steps=40, batch_size=16, lr=1e-2, warmup_steps=0, weight_decay=0.0, log_every=10)


def _member_train() -> TrainConfig:
    return TrainConfig(steps=60, batch_size=16, lr=1e-3, warmup_steps=5, weight_decay=0.0, log_every=10)


@dataclass(frozen=True)
class RewardStageConfig:
    members: int = 4
    # Where members start: shared (the probe) | baklava (the sft run's step checkpoints,
    # which needs sft.train.checkpoint_every > 0 and sft.train.keep_checkpoints: 0).
    init: str = "shared"
    method: str = "lora"  # how each member fine-tunes the probe: lora | dora | full
    # Diversity knobs, one entry per member (empty: train.lr for all; seeds train.seed + k).
    lrs: tuple[float, ...] = ()
    seeds: tuple[int, ...] = ()
    eval_pairs: int = 300  # pairs per evaluation set (0: every pair)
    eval_batch_size: int = 32
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)  # train: the world's pairs
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    probe: TrainConfig = field(default_factory=_probe_train)  # the linear probe (head only)
    train: TrainConfig = field(default_factory=_member_train)  # each member

    def __post_init__(self) -> None:
        if self.members < 1:
            raise LmlabError(f"reward.members must be at least 1 (WARM and ENS need 2 or more), got {self.members}")
        if self.method not in MEMBER_METHODS:
            raise LmlabError(f"reward.method (how members fine-tune the probe) must be one of "
                             f"{', '.join(MEMBER_METHODS)}, got {self.method!r}")
        from lmlab.rewards.members import INITS

        if self.init not in INITS:
            raise LmlabError(f"reward.init must be one of {', '.join(INITS)}, got {self.init!r}")
        for name in ("lrs", "seeds"):
            values = getattr(self, name)
            if values and len(values) != self.members:
                raise LmlabError(f"reward.{name} has {len(values)} entries for {self.members} members; give one "
                                 f"per member or none")
        if any(lr <= 0 for lr in self.lrs):
            raise LmlabError(f"reward.lrs must all be positive, got {list(self.lrs)}")
        if self.eval_pairs < 0 or self.eval_batch_size < 1:
            raise LmlabError("reward.eval_pairs must be >= 0 (0: all) and reward.eval_batch_size >= 1")

    def member_train(self, k: int) -> TrainConfig:
        from dataclasses import replace

        return replace(self.train, lr=self.lrs[k] if self.lrs else self.train.lr,
                       seed=self.seeds[k] if self.seeds else self.train.seed + k)


CONFIG = ("reward", RewardStageConfig)


def cost(recipe) -> float:
    from lmlab.stages.common import FORWARD, PAIR_TOKENS, train_tokens

    r = recipe.reward
    scored = (r.members + 1) * 4 * (r.eval_pairs or 300) * PAIR_TOKENS * FORWARD  # 4 evaluation sets
    return train_tokens(r.probe, PAIR_TOKENS) + r.members * train_tokens(r.train, PAIR_TOKENS) + scored


def run(ctx) -> None:
    import json
    from dataclasses import replace

    from lmlab.io import write_json_atomic
    from lmlab.rewards.accuracy import accuracies
    from lmlab.rewards.base import ModelReward
    from lmlab.rewards.members import baklava_starts, member_name, train_members
    from lmlab.rewards.train import RewardConfig
    from lmlab.stages.common import model_dir, preference_eval_sets, sort_world_preferences

    cfg, world = ctx.recipe.reward, ctx.recipe.world
    sft = model_dir(ctx.run_dir, "sft")
    data_path = cfg.data.train or str(sort_world_preferences(ctx.run_dir, world) / "preferences_train.jsonl")
    data = replace(cfg.data, train="")
    starts = baklava_starts(sft.parent / "checkpoints", cfg.members) if cfg.init == "baklava" else None
    ctx.echo(f"reward: linear probe on {sft}, then {cfg.members} members ({cfg.method}) from "
             + ("the probe" if starts is None else "SFT checkpoints " + ", ".join(p.name for p in starts)))
    trained = train_members(
        sft, data_path, ctx.out, RewardConfig(method="head", data=data, train=cfg.probe),
        [RewardConfig(method=cfg.method, data=data, adapter=cfg.adapter, train=cfg.member_train(k))
         for k in range(cfg.members)], starts, resume=ctx.resume, log=ctx.echo)
    probe = ctx.out / "probe"

    sets, counts = preference_eval_sets(ctx.run_dir, world, cfg.eval_pairs)
    device = cfg.train.device

    def evaluate(path):
        return accuracies(ModelReward.from_dir(path / "model", batch_size=cfg.eval_batch_size, device=device), sets)

    members = []
    for k in range(cfg.members):
        out = ctx.out / member_name(k)
        report_k = json.loads((out / REPORT).read_text(encoding="utf-8"))
        train_k = cfg.member_train(k)
        start = trained.starts[k]
        members.append({"name": member_name(k), "model": f"{member_name(k)}/model", "lr": train_k.lr,
                        "seed": train_k.seed, "steps": report_k["steps"], "accuracy": evaluate(out),
                        "start": str(start.relative_to(ctx.run_dir)) if start.is_relative_to(ctx.run_dir)
                        else str(start)})
        ctx.echo(f"reward: {member_name(k)} " + _format(members[-1]["accuracy"]))
    report = {"method": cfg.method, "init": cfg.init, "flip_rate": world.flip_rate, "members": members,
              "probe": {"model": "probe/model", "accuracy": evaluate(probe)},
              "sets": {k: len(v) for k, v in sets.items()}, "pairs": counts}
    ctx.echo("reward: probe " + _format(report["probe"]["accuracy"]))
    write_json_atomic(ctx.out / REPORT, report)


def _format(acc: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
