"""WARM's members (Ramé et al. 2024): a linear probe on the SFT model, then M reward
fine-tunes, each with its own learning rate and seed, started either

- "shared": all from the probe (one trunk, one head), or
- "baklava": from different step checkpoints of the one SFT run, each trunk carrying the
  probe's head (`RewardConfig.head_from`), so the members still share the head and the
  SFT trajectory and their weights still average (same shapes, same tokenizer).

    members = train_members(sft_model, prefs, out, probe_cfg, [cfg_0, ..., cfg_M-1],
                            starts=baklava_starts(sft_run / "checkpoints", M))
    warm_average(members.models, out / "warm")

What the reward stage and the WARM experiments share.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from lmlab.errors import LmlabError

INITS = ("shared", "baklava")
REPORT = "reward_report.json"  # written last by train_reward_model: a run that has it is complete
_STEP = re.compile(r"^step-(\d+)$")


def sft_checkpoints(checkpoints: str | Path) -> list[Path]:
    """The complete step checkpoints (step-N with a config.json) of a run, by step."""
    root = Path(checkpoints)
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = _STEP.match(path.name)
            if match and (path / "config.json").is_file():
                found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def spread(available: int, members: int) -> list[int]:
    """Indices of the checkpoints the members start from: evenly over the run, first and
    last included; with more members than checkpoints some share one (their learning rate
    and seed still differ)."""
    if available < 1 or members < 1:
        raise LmlabError(f"spread needs at least one checkpoint and one member, got {available} and {members}")
    if members == 1:
        return [available - 1]
    return [round(i * (available - 1) / (members - 1)) for i in range(members)]


def baklava_starts(checkpoints: str | Path, members: int) -> list[Path]:
    """Baklava's starting points: `members` step checkpoints of one SFT run (`spread`)."""
    found = sft_checkpoints(checkpoints)
    if len(found) < 2:
        raise LmlabError(f"Baklava starts members from different SFT checkpoints, but {checkpoints} holds "
                         f"{len(found)}: train the SFT with train.checkpoint_every > 0 and "
                         "train.keep_checkpoints: 0 (keep them all)")
    return [found[i] for i in spread(len(found), members)]


@dataclass
class Members:
    probe: Path  # the probe's reward checkpoint
    models: list[Path]  # each member's reward checkpoint (run_dir/model)
    starts: list[Path]  # where each member's trunk came from (the probe, or an SFT checkpoint)


def train_members(sft_model: str | Path, prefs: str | Path, out: str | Path, probe, members: Sequence,
                  starts: Sequence[str | Path] | None = None, *, resume: bool = False,
                  log: Callable[[str], None] = print) -> Members:
    """Train the probe (`probe`: a RewardConfig, method "head") on `sft_model` into out/probe,
    then member k (`members[k]`: a RewardConfig) into out/member-k, from the probe or, with
    `starts`, from starts[k] carrying the probe's head. With `resume`, a run that finished
    (its report written) is reused and an interrupted one continues from its checkpoint."""
    import torch

    from lmlab.rewards.train import train_reward_model

    out = Path(out)
    if probe.method != "head":
        raise LmlabError(f"WARM's shared start is a linear probe: the probe config needs method 'head', got "
                         f"{probe.method!r}")
    if starts is not None and len(starts) != len(members):
        raise LmlabError(f"{len(starts)} starting checkpoints for {len(members)} members; give one per member")

    def once(base, run_dir: Path, cfg) -> Path:
        if resume and (run_dir / REPORT).is_file():
            log(f"{run_dir.name}: complete, reusing {run_dir / 'model'}")
        else:
            torch.manual_seed(cfg.train.seed)  # an adapter's initialisation differs per member too
            train_reward_model(base, prefs, run_dir, cfg, resume="auto" if resume else False, log=log)
        return run_dir / "model"

    probe_dir = once(sft_model, out / "probe", probe)
    bases = [probe_dir] * len(members) if starts is None else [Path(s) for s in starts]
    models = []
    for k, (cfg, base) in enumerate(zip(members, bases)):
        if starts is not None:
            cfg = replace(cfg, head_from=str(probe_dir))
        models.append(once(base, out / member_name(k), cfg))
    return Members(probe_dir, models, bases)


def member_name(k: int) -> str:
    return f"member-{k}"
