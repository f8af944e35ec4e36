"""Iterative (online-ish) DPO: K rounds of
    sample `samples` answers per prompt from the current policy (batched generation)
    -> score them with a `Reward` (gold, a reward model, an ensemble, WARM)
    -> pair the best against the worst answer of each prompt -> DPO on those pairs,
each round continuing from the last one's policy.

    result = iterative_dpo("runs/sft/model", prompts, "runs/idpo", cfg, reward)

The reference is either fixed at the start policy (`iterative.refresh_reference: false`)
or the policy each round starts from (true); both occur in the literature (Xu et al. 2024
refresh it; Snorkel's iterative DPO keeps it).

Every round is resumable: `round-k/pairs.jsonl` is written once sampled (a rerun reuses
it, so the round trains on the same pairs), `round-k/dpo/` is an ordinary DPO run (its
checkpoints resume), and `round-k/round.json`, written last, marks the round complete.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lmlab.align.dpo import DPOConfig, dpo_on_pairs
from lmlab.data.preference import PLAIN, PreferencePair
from lmlab.errors import LmlabError
from lmlab.io import read_json, write_json_atomic, write_jsonl_atomic

ROUND_MARKER = "round.json"
REPORT = "iterative_report.json"


@dataclass
class IterativeResult:
    rounds: list[dict[str, Any]]
    model_dir: Path


def make_reward(spec: str, device: str = "cpu"):
    """"gold" (SortWorld's programmatic reward), a reward-model directory, or several
    directories joined by commas (an ensemble: the mean of the members)."""
    from lmlab.rewards import EnsembleReward, GoldReward, ModelReward

    if spec == "gold":
        return GoldReward("sort", "dense")
    paths = [p.strip() for p in spec.split(",") if p.strip()]
    if not paths:
        raise LmlabError("iterative.reward is empty; use gold or a reward-model directory")
    members = [ModelReward.from_dir(p, device=device) for p in paths]
    return members[0] if len(members) == 1 else EnsembleReward(members)


def score_samples(reward, prompts: Sequence, answers: Sequence[str], ended: Sequence[bool]) -> torch.Tensor:
    """(N,) scores. A programmatic gold reward is told which answers ended (an answer cut
    off at max_new_tokens loses its end bonus); a learnt reward reads the text as it is.
    An empty answer gets NaN from a learnt reward: its chat template cannot render one (and
    DPO could not train on it), so `best_vs_worst` leaves it out instead of the whole round
    failing on the first policy sample that stops at once."""
    from lmlab.rewards import GoldReward

    if not isinstance(reward, GoldReward):
        out = torch.full((len(answers),), float("nan"))
        keep = [i for i, a in enumerate(answers) if a.strip()]
        if keep:
            out[keep] = reward.score([prompts[i] for i in keep], [answers[i] for i in keep]).float()
        return out
    out = torch.empty(len(answers))
    for flag in (True, False):
        idx = [i for i, e in enumerate(ended) if e == flag]
        if idx:
            part = GoldReward(reward.world, reward.kind, ended=flag)
            out[idx] = part.score([prompts[i] for i in idx], [answers[i] for i in idx])
    return out


class Sampler:
    """Prompt encoding and batched sampling with the policy's template."""

    def __init__(self, tokenizer, template: str) -> None:
        from lmlab.train.finetune import make_template

        self.tokenizer = tokenizer
        if template == PLAIN:
            self.template, self.eos_id = None, tokenizer.eos_id
        else:
            self.template = make_template(template, tokenizer)
            self.eos_id = self.template.stop_ids[0]

    def encode(self, prompt) -> list[int]:
        if self.template is None:
            bos = [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []
            return bos + list(self.tokenizer.encode(prompt))
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return self.template.encode_prompt(messages)

    @torch.no_grad()
    def sample(self, model, prompts: Sequence, n: int, cfg, seed: int, precision) -> tuple[list[str], list[bool]]:
        """`n` answers per prompt (prompt 0's first), their texts and whether each ended."""
        from lmlab.decode.generate import generate

        rows = [self.encode(p) for p in prompts for _ in range(n)]
        was_training = model.training
        model.eval()
        texts, ended = [], []
        try:
            for k, start in enumerate(range(0, len(rows), cfg.batch_size)):
                with precision.autocast():
                    outs = generate(model, rows[start:start + cfg.batch_size], cfg.max_new_tokens,
                                    temperature=cfg.temperature, top_p=cfg.top_p, eos_id=self.eos_id,
                                    seed=seed * 1_000_003 + k, pad_id=0)
                for o in outs:
                    body = o.tokens[:-1] if o.finish_reason == "eos" else o.tokens
                    texts.append(self.tokenizer.decode(body))
                    ended.append(o.finish_reason == "eos")
        finally:
            model.train(was_training)
        return texts, ended


def best_vs_worst(prompts: Sequence, answers: Sequence[str], scores: torch.Tensor, n: int,
                  round_name: str) -> list[dict[str, Any]]:
    """One pair per prompt: its highest- against its lowest-scored answer (the first of
    equals), among its non-empty answers with a score (an empty answer cannot be a side of
    a pair; NaN marks an answer the reward could not score). Prompts whose candidates all
    score alike, or whose best and worst texts are the same, give no pair."""
    rows = []
    grouped = scores.view(-1, n)
    for i, prompt in enumerate(prompts):
        g = grouped[i]
        usable = [j for j in range(n) if answers[i * n + j].strip() and not bool(torch.isnan(g[j]))]
        if len(usable) < 2:
            continue
        best = max(usable, key=lambda j: (float(g[j]), -j))
        worst = min(usable, key=lambda j: (float(g[j]), j))
        chosen, rejected = answers[i * n + best], answers[i * n + worst]
        if float(g[best]) == float(g[worst]) or chosen == rejected:
            continue
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                     "chosen_reward": float(g[best]), "rejected_reward": float(g[worst])})
    if not rows:
        raise LmlabError(f"{round_name}: for every prompt all {n} samples scored the same (or were identical or "
                         "empty), so there is no pair to learn from; raise iterative.temperature or "
                         "iterative.samples")
    return rows


def prompts_of(path: str | Path, limit: int = 0) -> list:
    """The distinct prompts of a preference (or prompt) JSONL file, in order."""
    from lmlab.data.preference import read_preference_jsonl

    seen, out = set(), []
    for p in read_preference_jsonl(path).pairs:
        key = json.dumps(p.prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(p.prompt)
    return out[:limit] if limit else out


def iterative_dpo(base_dir: str | Path, prompts: Sequence, out_dir: str | Path, cfg: DPOConfig, reward, *,
                  resume: bool = False, log: Callable[[str], None] = print) -> IterativeResult:
    """`cfg.iterative.rounds` rounds of sample -> label -> DPO from the policy at
    `base_dir`; round k's policy is round-k/dpo/model."""
    from lmlab.checkpoint import save_model
    from lmlab.hub import load_model
    from lmlab.precision import resolve
    from lmlab.tokenizer import Tokenizer

    it = cfg.iterative
    out_dir = Path(out_dir)
    if not prompts:
        raise LmlabError("iterative DPO needs prompts; data.train names none")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not resume:
        raise LmlabError(f"{out_dir} already holds an iterative DPO run: pass --resume to continue it, "
                         "or choose another out")
    tokenizer = Tokenizer.load(base_dir)
    sampler = Sampler(tokenizer, cfg.data.template)
    device = cfg.train.device
    precision = resolve(cfg.train.precision, torch.device(device))
    # DPO in each round starts fresh from the previous round's merged policy.
    round_cfg = replace(cfg, sft_first=False)
    current = Path(base_dir)
    rounds: list[dict[str, Any]] = []
    for k in range(1, it.rounds + 1):
        rdir = out_dir / f"round-{k}"
        marker = rdir / ROUND_MARKER
        if marker.is_file():
            info = read_json(marker, "")
            log(f"round {k}: complete (mean reward {info['mean_reward']:.3f}), skipped")
            rounds.append(info)
            current = rdir / "dpo" / "model"
            continue
        policy = load_model(current, device=device)
        pairs_file = rdir / "pairs.jsonl"
        if pairs_file.is_file():
            rows = [json.loads(line) for line in pairs_file.read_text(encoding="utf-8").splitlines() if line]
            sampled = read_json(rdir / "samples.json", "")
            log(f"round {k}: reusing the {len(rows)} pairs sampled before")
        else:
            answers, ended = sampler.sample(policy, prompts, it.samples, it, cfg.train.seed + k, precision)
            reps = [p for p in prompts for _ in range(it.samples)]
            scores = score_samples(reward, reps, answers, ended)
            rows = best_vs_worst(prompts, answers, scores, it.samples, f"round {k}")
            # Unscored (empty) answers are left out of the means and counted.
            best = scores.view(-1, it.samples).nan_to_num(float("-inf")).max(-1).values
            sampled = {"mean_reward": float(scores.nanmean()), "best_mean_reward": float(best[best.isfinite()].mean()),
                       "ended": sum(ended) / len(ended), "samples": len(answers),
                       "empty": sum(not a.strip() for a in answers)}
            rdir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(rdir / "samples.json", sampled)
            write_jsonl_atomic(pairs_file, rows)  # last: its presence means the sampling is complete
        log(f"round {k}: mean reward {sampled['mean_reward']:.3f} (best of {it.samples}: "
            f"{sampled['best_mean_reward']:.3f}), {len(rows)} pairs")
        pairs = [PreferencePair(r["prompt"] if isinstance(r["prompt"], str) else tuple(r["prompt"]), r["chosen"],
                                r["rejected"], source=f"{pairs_file}:{i + 1}") for i, r in enumerate(rows)]
        reference = None
        if not it.refresh_reference and k > 1:
            reference = load_model(base_dir, device=device)  # fixed at the start policy
        result = dpo_on_pairs(policy, tokenizer, pairs, None, rdir / "dpo", round_cfg, reference=reference,
                              base_dir=current, resume="auto", log=log)
        info = {"round": k, **sampled, "pairs": len(rows), "reference": "start" if not it.refresh_reference
                else "round start", "dpo_train": result.report["train"], "policy": str(current)}
        write_json_atomic(marker, info)
        rounds.append(info)
        current = rdir / "dpo" / "model"
    final = load_model(current, device=device)
    model_dir = save_model(final, out_dir / "model", tokenizer=tokenizer,
                           extra={"train": {"objective": "iterative_dpo", "rounds": it.rounds}})
    write_json_atomic(out_dir / REPORT, {"rounds": rounds, "reward": it.reward, "samples": it.samples,
                                         "refresh_reference": it.refresh_reference, "model": str(model_dir)})
    return IterativeResult(rounds, Path(model_dir))


def iterative_dpo_recipe(path: str | Path, overrides: Sequence[str] = (), resume: bool = False,
                         log: Callable[[str], None] = print) -> IterativeResult:
    """`lmlab align iterative-dpo --config R`: the DPO recipe plus its `iterative:` section;
    the prompts are data.train's (a preference JSONL), the reward iterative.reward."""
    from lmlab.align.dpo import load_dpo_recipe

    cfg = load_dpo_recipe(path, overrides)
    prompts = prompts_of(cfg.data.train, cfg.iterative.prompts)
    base = cfg.base
    if cfg.sft_first:
        from lmlab.align.dpo import sft_on_chosen, split_pairs
        from lmlab.hub import load_model
        from lmlab.tokenizer import Tokenizer

        pairs = split_pairs(cfg.data)[0]
        sft_dir = Path(cfg.out) / "sft_first"
        policy = load_model(base, device=cfg.train.device)
        sft_on_chosen(policy, Tokenizer.load(base), pairs, cfg, sft_dir, base, resume, log)
        base = str(sft_dir / "model")
    reward = make_reward(cfg.iterative.reward, cfg.train.device)
    return iterative_dpo(base, prompts, Path(cfg.out) / "rounds" if cfg.sft_first else cfg.out, cfg, reward,
                         resume=resume, log=log)
