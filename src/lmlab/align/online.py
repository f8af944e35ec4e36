"""Online RL from an SFT policy: PPO, GRPO (Dr. GRPO, DAPO options) and RLOO, one code path
behind the stages `ppo`, `grpo`, `rloo` and `lmlab align ppo|grpo|rloo --config R`.

    result = align_online(OnlineRLConfig(method="grpo", policy="runs/x/sft/model",
                                         prompts="runs/x/world/sft.jsonl"), "runs/grpo")

The reward is any `Reward`: the world's programmatic gold reward (SortWorld, dense or
sparse: the verifiable case), a reward-model directory, several (ENS: a prediction
ensemble) or several weight-averaged into one (WARM), optionally with a format penalty for
answers that never stop. Writes, under the output directory: what `train` writes
(metrics.jsonl with reward, gold reward, KL, clip fraction, ... per step; checkpoints/),
`model/` (the policy), `value/` (PPO's critic) and `rl_report.json` (greedy gold reward and
exact match on held-out prompts before and after, KL to the SFT policy, wall time, the
share of it spent generating).

Sizes: a rollout is `rollout.prompts x rollout.group_size` completions; each is read
`rollout.epochs` times in `minibatches` optimizer steps per epoch, in micro-batches of
`train.micro_batch_size`. `iterations` rollouts are made, so `train.steps` and
`train.batch_size` are derived (the values in the recipe are ignored). `large_batch: false`
(Xu et al.'s ablation) divides the rollout's prompts by `small_batch_divisor`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from lmlab.config import from_mapping
from lmlab.data.chat import read_prompts
from lmlab.errors import LmlabError
from lmlab.train.config import TrainConfig
from lmlab.train.objectives.grpo import GRPOConfig
from lmlab.train.objectives.ppo import PPOConfig
from lmlab.train.rollout import RolloutConfig

METHODS = ("ppo", "grpo", "rloo")
REWARD_KINDS = ("gold", "model", "ensemble", "warm")
VALUE_INITS = ("policy", "reward")
REPORT_FILE = "rl_report.json"


@dataclass(frozen=True)
class RewardSpec:
    kind: str = "gold"  # gold (the world's checker) | model (one RM dir) | ensemble (ENS) | warm (WARM)
    gold: str = "dense"  # gold kind: dense | sparse (verifiable: exactly right and stopped)
    paths: tuple[str, ...] = ()  # reward-model directories (model: one; ensemble, warm: two or more)
    ensemble_mode: str = "mean"  # mean | mean_minus_std
    ensemble_k: float = 1.0
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.kind not in REWARD_KINDS:
            raise LmlabError(f"reward.kind must be one of {REWARD_KINDS}, got {self.kind!r}")
        want = {"gold": (0, 0), "model": (1, 1), "ensemble": (2, None), "warm": (2, None)}[self.kind]
        n = len(self.paths)
        if n < want[0] or (want[1] is not None and n > want[1]):
            need = {"gold": "no paths", "model": "exactly one reward-model directory",
                    "ensemble": "two or more reward-model directories", "warm": "two or more reward-model "
                    "directories fine-tuned from one initialisation"}[self.kind]
            raise LmlabError(f"reward.kind {self.kind!r} takes {need} in reward.paths, got {n}")


@dataclass(frozen=True)
class OnlineRLConfig:
    method: str = ""  # ppo | grpo | rloo; "" takes the stage's or the command's
    policy: str = ""  # the start policy (in `lmlab run`: the sft stage's model, or e.g. rejection/model)
    prompts: str = ""  # JSONL: {"prompt": ...} or chat records (their first user turn)
    eval_prompts: str | None = None  # held-out prompts for the report (`lmlab run`: the world's eval.jsonl)
    eval_n: int = 64  # held-out prompts answered greedily for the report
    out: str = "runs/online-rl"
    template: str = "lmlab"  # chat template of the policy: lmlab | none | a tokenizer_config path
    world: str = "sort"  # the gold world (logged beside a learned reward; the report's exact match)
    iterations: int = 20  # rollouts
    minibatches: int = 1  # optimizer steps per epoch over one rollout
    large_batch: bool = True  # Xu et al.: off divides rollout.prompts by small_batch_divisor
    small_batch_divisor: int = 8
    value_init: str = "policy"  # PPO critic: policy (SFT trunk, zero head) | reward (the RM) | a checkpoint dir
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardSpec = field(default_factory=RewardSpec)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    # The loop's settings (lr, precision, micro_batch_size, checkpoint_every, ...); its steps
    # and batch_size are derived from the rollout sizes above.
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.method and self.method not in METHODS:
            raise LmlabError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.iterations < 1 or self.minibatches < 1 or self.small_batch_divisor < 1 or self.eval_n < 0:
            raise LmlabError("iterations, minibatches and small_batch_divisor must be >= 1 (eval_n >= 0)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "OnlineRLConfig":
        return from_mapping(cls, data, where="online RL")

    def effective_rollout(self) -> RolloutConfig:
        if self.large_batch:
            return self.rollout
        return replace(self.rollout, prompts=max(1, self.rollout.prompts // self.small_batch_divisor))

    def effective_train(self) -> TrainConfig:
        rollout = self.effective_rollout()
        if rollout.rows % self.minibatches:
            raise LmlabError(f"a rollout of {rollout.rows} completions does not split into {self.minibatches} "
                             "minibatches; change minibatches or rollout.prompts / group_size")
        batch = rollout.rows // self.minibatches
        micro = self.train.micro_batch_size
        if micro is not None and batch % micro:
            raise LmlabError(f"train.micro_batch_size={micro} must divide the minibatch of {batch} completions")
        return replace(self.train, batch_size=batch, steps=self.iterations * rollout.epochs * self.minibatches)


@dataclass
class OnlineRLResult:
    run_dir: Path
    report: dict[str, Any]


def build_reward(spec: RewardSpec, world: str, out: Path, device: str = "cpu"):
    """The `Reward` the spec names (WARM members are averaged into out/warm_reward once)."""
    from lmlab.rewards import EnsembleReward, GoldReward, ModelReward

    if spec.kind == "gold":
        return GoldReward(world, spec.gold)
    if spec.kind == "model":
        return ModelReward.from_dir(spec.paths[0], batch_size=spec.batch_size, device=device)
    if spec.kind == "ensemble":
        members = [ModelReward.from_dir(p, batch_size=spec.batch_size, device=device) for p in spec.paths]
        return EnsembleReward(members, spec.ensemble_mode, spec.ensemble_k)
    from lmlab.merge import warm_average

    merged = out / "warm_reward"
    if not (merged / "config.json").is_file():
        warm_average(list(spec.paths), merged)
    return ModelReward.from_dir(merged, batch_size=spec.batch_size, device=device)


def build_objective(cfg: OnlineRLConfig, policy, rollout: RolloutConfig, reward, device: str):
    import copy

    from lmlab.model.heads import ValueModel
    from lmlab.train.objectives.grpo import GRPO
    from lmlab.train.objectives.ppo import PPO

    common = dict(temperature=rollout.temperature, max_new_tokens=rollout.max_new_tokens)
    if cfg.method == "ppo":
        value = None
        if not cfg.ppo.shared_trunk:
            if cfg.value_init == "policy":
                value = ValueModel.from_lm(copy.deepcopy(policy))
            elif cfg.value_init == "reward":
                rm = getattr(reward, "rm", None)
                if rm is None:
                    raise LmlabError("value_init: reward needs a learned reward (reward.kind model or warm); "
                                     "use value_init: policy with the gold reward")
                value = ValueModel.from_reward_model(copy.deepcopy(rm))
            else:
                from lmlab.checkpoint import read_config_json
                from lmlab.hub import load_model

                kind = read_config_json(cfg.value_init).get("kind")
                loaded = load_model(cfg.value_init, device=device)
                if kind == "value":
                    value = loaded
                elif kind == "reward":
                    value = ValueModel.from_reward_model(loaded)
                else:
                    raise LmlabError(f"value_init {cfg.value_init} is a {kind!r} checkpoint; give a value or reward "
                                     "checkpoint, or policy / reward")
        return PPO(policy, cfg.ppo, value_model=value, **common)
    grpo = cfg.grpo if cfg.method == "grpo" else replace(cfg.grpo, advantage="rloo")
    if cfg.method == "grpo" and grpo.advantage == "rloo":
        raise LmlabError("method grpo with grpo.advantage rloo: run method rloo instead")
    return GRPO(policy, grpo, group_size=rollout.group_size, **common)


@torch.no_grad()
def evaluate_policy(policy, reference, tokenizer, prompts: list[str], template: str, max_new_tokens: int,
                    world: str = "sort", seed: int = 0) -> dict[str, float]:
    """Greedy answers scored by the world's gold reward (dense, sparse, exact match), and
    KL(policy || reference) estimated from samples at temperature 1 (mean summed k1)."""
    from lmlab.decode.generate import generate
    from lmlab.eval.gold import sampled_kl
    from lmlab.train.rollout import encode_prompts, stop_id
    from lmlab.worlds.evaluate import exact_match, sort_rewards

    ids = encode_prompts(prompts, tokenizer, template)
    stop = stop_id(tokenizer, template)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    greedy = generate(policy, ids, max_new_tokens, eos_id=stop, pad_id=pad, decode=tokenizer.decode)
    out: dict[str, float] = {}
    if world == "sort":
        from lmlab.worlds.sort import parse_prompt

        answers = [g.text for g in greedy]
        gold = sort_rewards(prompts, answers, [g.finish_reason for g in greedy])
        out["gold_dense"] = sum(gold["gold_dense"]) / len(prompts)
        out["gold_sparse"] = sum(gold["gold_sparse"]) / len(prompts)
        out["exact_match"] = exact_match(answers, [parse_prompt(p).ideal for p in prompts])
    if reference is not None:
        out["kl_to_sft"] = sampled_kl(policy, reference, ids, max_new_tokens=max_new_tokens, stop=stop, pad=pad,
                                      seed=seed)
    return out


def align_online(cfg: OnlineRLConfig, out: str | Path, *, resume: bool | str = False,
                 log: Callable[[str], None] = print) -> OnlineRLResult:
    """Open the SFT policy and its tokenizer, build the reward, train with `cfg.method`,
    save the policy (and critic) and the report."""
    import copy

    from lmlab.checkpoint import save_model
    from lmlab.hub import load_model
    from lmlab.io import write_json_atomic
    from lmlab.rewards import GoldReward
    from lmlab.tokenizer import Tokenizer
    from lmlab.train.loop import train
    from lmlab.train.rollout import Rollouts

    out = Path(out)
    if cfg.method not in METHODS:
        raise LmlabError(f"choose the method: one of {', '.join(METHODS)}")
    if not cfg.policy:
        raise LmlabError("set `policy:` to the SFT model directory to start from")
    if not cfg.prompts:
        raise LmlabError("set `prompts:` to a JSONL of prompts ({\"prompt\": ...} or chat records)")
    out.mkdir(parents=True, exist_ok=True)
    device = cfg.train.device
    policy = load_model(cfg.policy, device=device)
    tokenizer = Tokenizer.load(cfg.policy)
    sft = copy.deepcopy(policy).requires_grad_(False).eval()
    prompts = read_prompts(cfg.prompts)
    rollout = cfg.effective_rollout()
    train_cfg = cfg.effective_train()
    reward = build_reward(cfg.reward, cfg.world, out, device)
    gold = None
    if cfg.world == "sort" and not (cfg.reward.kind == "gold" and cfg.reward.gold == "dense"):
        gold = GoldReward(cfg.world, "dense")  # logged beside the training reward
    objective = build_objective(cfg, policy, rollout, reward, device)
    source = Rollouts(policy, tokenizer, prompts, reward, rollout, objective, gold=gold, template=cfg.template)
    eval_prompts = read_prompts(cfg.eval_prompts)[:cfg.eval_n] if cfg.eval_prompts and cfg.eval_n else []
    # Before training the policy is its reference: KL 0 exactly, not an estimate.
    before = ({**evaluate_policy(policy, None, tokenizer, eval_prompts, cfg.template, rollout.max_new_tokens,
                                 cfg.world), "kl_to_sft": 0.0} if eval_prompts else {})
    log(f"{cfg.method}: {cfg.iterations} rollouts of {rollout.rows} completions ({rollout.prompts} prompts x "
        f"{rollout.group_size}), {train_cfg.steps} optimizer steps of {train_cfg.batch_size}")
    t0 = time.perf_counter()
    result = train(policy, objective, source, train_cfg, out, tokenizer=tokenizer, resume=resume, log=log,
                   extra={"online_rl": {"method": cfg.method}})
    wall = time.perf_counter() - t0
    after = (evaluate_policy(policy, sft, tokenizer, eval_prompts, cfg.template, rollout.max_new_tokens, cfg.world)
             if eval_prompts else {})
    save_model(policy, out / "model", tokenizer=tokenizer, extra={"online_rl": {"method": cfg.method,
                                                                               "steps": result.step}})
    if cfg.method == "ppo" and objective.value_model is not None:
        save_model(objective.value_model, out / "value", tokenizer=tokenizer)
    report = {"method": cfg.method, "iterations": cfg.iterations, "steps": result.step,
              "rollout": asdict(rollout), "train": {"batch_size": train_cfg.batch_size, "lr": train_cfg.lr},
              "reward": asdict(cfg.reward), "seconds": wall, "generate_seconds": source.generate_seconds,
              "generate_share": source.generate_seconds / wall if wall > 0 else None,
              "before": before, "after": after, "precision": result.precision.name}
    write_json_atomic(out / REPORT_FILE, report)
    log(f"{cfg.method}: done in {wall:.1f} s ({100 * report['generate_share']:.0f}% generating); "
        + ", ".join(f"{k} {before.get(k, float('nan')):.3f} -> {v:.3f}" for k, v in after.items()))
    return OnlineRLResult(out, report)


def rollout_cost(cfg: OnlineRLConfig) -> float:
    """Roughly how much work a run is, for `lmlab run`'s time estimate (lmlab.stages.common)."""
    from lmlab.stages.common import FORWARD, generated_tokens

    r = cfg.effective_rollout()
    trained = r.rows * r.max_new_tokens * (r.epochs + 2 * FORWARD)  # + old and reference log-probs
    return cfg.iterations * (generated_tokens(r.rows, r.max_new_tokens) + trained) + \
        generated_tokens(2 * cfg.eval_n, r.max_new_tokens)


def run_stage(ctx, cfg: OnlineRLConfig) -> None:
    """A pipeline stage (its name is the method): the policy defaults to the sft stage's
    model, the prompts to the world's SFT prompts and the held-out ones to its eval prompts."""
    from lmlab.stages.common import in_run, policy_dir, require

    if cfg.method and cfg.method != ctx.name:
        raise LmlabError(f"the {ctx.name} section sets method {cfg.method!r}; the stage's name is its method "
                         f"(drop {ctx.name}.method, or use the {cfg.method} stage)")
    cfg = replace(cfg, method=ctx.name)

    policy = str(policy_dir(ctx, cfg.policy))
    prompts = cfg.prompts or str(require(ctx.input("world") / "sft.jsonl", "world"))
    held_out = cfg.eval_prompts
    if held_out is None and (ctx.input("world") / "eval.jsonl").is_file():
        held_out = str(ctx.input("world") / "eval.jsonl")
    # Reward models named relative to the run (e.g. warm/model, reward/member-0/model) are
    # the earlier stages' outputs: PPO against WARM inside one `lmlab run`.
    paths = in_run(ctx, tuple(cfg.reward.paths))
    cfg = replace(cfg, policy=policy, prompts=prompts, eval_prompts=held_out, out=str(ctx.out),
                  reward=replace(cfg.reward, paths=paths))
    align_online(cfg, ctx.out, resume="auto" if ctx.resume else False, log=ctx.echo)


def align_recipe(method: str, path: str | Path, overrides: list[str] = (), resume: bool = False,
                 log: Callable[[str], None] = print) -> OnlineRLResult:
    """`lmlab align ppo|grpo|rloo --config R`: the recipe is an OnlineRLConfig mapping."""
    from lmlab.config import load_yaml
    from lmlab.train.config import apply_overrides

    data = apply_overrides(load_yaml(path), list(overrides))
    if data.get("method") not in (None, "", method):
        raise LmlabError(f"{path} sets method {data['method']!r} but the command is `lmlab align {method}`; "
                         "drop `method:` from the recipe")
    data["method"] = method
    cfg = OnlineRLConfig.from_dict(data)
    return align_online(cfg, cfg.out, resume=resume, log=log)
