"""A noisy preference labeller for SortWorld: the stand-in for human raters.

It prefers answers by Bradley–Terry on the gold reward plus spurious cues the gold reward
does not want, then flips a fraction of labels:
    s(x, y)   = r*(x, y) + length_weight * len(y) + filler_weight * count(FILLER in y)
    P(a > b)  = sigmoid((s(x, a) - s(x, b)) / temperature)
    P(label says a > b) = (1 - flip_rate) * P(a > b) + flip_rate * (1 - P(a > b))
len(y) counts answer tokens (space-separated words). A reward model trained on these labels
learns the cues; a policy optimised against it pads answers with fillers, and the gold
reward (which charges every extra token) shows the hack.

Pairs come from policy samples (real model samples, or `sort.noisy_answer` as a synthetic
policy) plus edits of them (drop, swap, repeat, filler insertion). The in-distribution
split samples a cool policy on one set of prompts; the out-of-distribution split samples a
hot policy on disjoint prompts, so its answers carry more and stranger errors.

Only this module and `lmlab.worlds.evaluate` may import the gold reward; training code sees
labels, never r* (tests/test_worlds.py checks the import rule).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from lmlab.errors import LmlabError
from lmlab.worlds.sort import EDITS, FILLER, SortTask, apply_edit, gold_reward, noisy_answer


@dataclass(frozen=True)
class LabellerConfig:
    temperature: float = 0.1
    length_weight: float = 0.05
    filler_weight: float = 0.1
    flip_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise LmlabError(f"labeller.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.flip_rate <= 0.5:
            raise LmlabError(f"labeller.flip_rate must be in [0, 0.5], got {self.flip_rate}")


@dataclass(frozen=True)
class Preference:
    prompt: str
    chosen: str
    rejected: str


def labeller_score(task: SortTask, answer: str, cfg: LabellerConfig) -> float:
    """s(x, y): what the labeller actually likes (gold reward plus the spurious cues).
    Answers in pairs always end (a chat template closes them), so r* gets ended=True."""
    tokens = answer.split()
    return (gold_reward(task.symbols, answer, ended=True) + cfg.length_weight * len(tokens)
            + cfg.filler_weight * tokens.count(FILLER))


def prob_first_preferred(task: SortTask, a: str, b: str, cfg: LabellerConfig) -> float:
    """Probability that the labeller's label says a > b, flips included."""
    z = (labeller_score(task, a, cfg) - labeller_score(task, b, cfg)) / cfg.temperature
    p = 0.5 * (1.0 + math.tanh(0.5 * z))  # sigmoid, without overflow for large |z|
    return (1.0 - cfg.flip_rate) * p + cfg.flip_rate * (1.0 - p)


def label_pairs(pairs: Iterable[tuple[SortTask, str, str]], cfg: LabellerConfig, seed: int) -> list[Preference]:
    rng = random.Random(f"labeller:{seed}")
    out = []
    for task, a, b in pairs:
        if rng.random() < prob_first_preferred(task, a, b, cfg):
            out.append(Preference(task.prompt, a, b))
        else:
            out.append(Preference(task.prompt, b, a))
    return out


def candidates(samples: Sequence[str], rng: random.Random) -> list[str]:
    """Distinct non-empty answers to compare: the samples plus each edit applied to a random
    sample. An empty answer (a one-symbol answer after a drop) is left out: the preference
    and chat readers refuse empty answers, so no pair may have one."""
    if not samples:
        raise LmlabError("need at least one sample per prompt to build preference pairs")
    pool = list(samples)
    for edit in EDITS:
        pool.append(" ".join(apply_edit(rng.choice(samples).split(), edit, rng)))
    return [a for a in dict.fromkeys(pool) if a.strip()]


def build_pairs(tasks: Sequence[SortTask], sampler: Callable[[SortTask, random.Random], list[str]],
                pairs_per_task: int, seed: int) -> list[tuple[SortTask, str, str]]:
    """Unlabelled pairs (task, a, b) with a != b; `sampler(task, rng)` returns policy samples
    (wrap a model's generate here, or use `synthetic_sampler`)."""
    rng = random.Random(f"pairs:{seed}")
    pairs = []
    for task in tasks:
        pool = candidates(sampler(task, rng), rng)
        if len(pool) < 2:
            continue
        for _ in range(pairs_per_task):
            a, b = rng.sample(pool, 2)
            pairs.append((task, a, b))
    return pairs


def synthetic_sampler(temperature: float, n_samples: int = 2) -> Callable[[SortTask, random.Random], list[str]]:
    """A policy with no model behind it: `n_samples` noisy answers at `temperature`."""
    return lambda task, rng: [noisy_answer(task, temperature, rng) for _ in range(n_samples)]


@dataclass(frozen=True)
class SplitConfig:
    n_train_prompts: int = 2000
    n_ood_prompts: int = 500
    pairs_per_prompt: int = 2
    id_temperature: float = 0.5  # cool policy: the training distribution
    ood_temperature: float = 2.0  # hot policy on unseen prompts: the shifted one


def preference_splits(tasks: Sequence[SortTask], seed: int, labeller: LabellerConfig = LabellerConfig(),
                      split: SplitConfig = SplitConfig()) -> dict[str, list[Preference]]:
    """{"train", "test_id", "test_ood"} on disjoint slices of `tasks` (distinct prompts, e.g.
    from `sort.sample_tasks`): test_id holds out a tenth of the cool policy's prompts;
    test_ood samples the hot policy on the last `n_ood_prompts` prompts."""
    n_id = split.n_train_prompts
    if len(tasks) < n_id + split.n_ood_prompts:
        raise LmlabError(f"preference splits need {n_id + split.n_ood_prompts} prompts, got {len(tasks)}")
    n_test = max(1, n_id // 10)
    cool, hot = synthetic_sampler(split.id_temperature), synthetic_sampler(split.ood_temperature)
    parts = {
        "train": build_pairs(tasks[n_test:n_id], cool, split.pairs_per_prompt, seed),
        "test_id": build_pairs(tasks[:n_test], cool, split.pairs_per_prompt, seed + 1),
        "test_ood": build_pairs(tasks[n_id:n_id + split.n_ood_prompts], hot, split.pairs_per_prompt, seed + 2),
    }
    return {name: label_pairs(pairs, labeller, seed + i) for i, (name, pairs) in enumerate(parts.items())}
