"""Pairwise accuracy of any `Reward` (one RM, WARM, ENS, the gold reward) on preference
pairs, and the pair sets of WARM's robustness table, built with a world's gold reward:

- train_clean: training pairs whose label agrees with the gold reward;
- train_noisy: training pairs whose label contradicts it (flipped labels, and the labeller's
  cue-driven or random choices): accuracy here is memorisation of label noise, lower is
  more robust;
- test_id / test_ood: held-out pairs (in distribution / from a shifted policy on unseen
  prompts), oriented by the gold reward, so accuracy there is agreement with r*.

Pairs the gold reward ties are left out of every set (and counted).
"""
from __future__ import annotations

from typing import Sequence

import torch

from lmlab.data.preference import PreferencePair
from lmlab.errors import LmlabError


def pair_scores(reward, pairs: Sequence[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores of every pair, in one call of `reward.score`."""
    if not pairs:
        raise LmlabError("no preference pairs to score")
    prompts = [p.prompt for p in pairs]
    scores = reward.score(prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs]).float()
    return scores[: len(pairs)], scores[len(pairs):]


def accuracy_from_scores(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs scored chosen > rejected; a tie counts half (as BradleyTerry's metric)."""
    return float(((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean())


def pair_accuracy(reward, pairs: Sequence[PreferencePair]) -> float:
    return accuracy_from_scores(*pair_scores(reward, pairs))


def _swap(p: PreferencePair) -> PreferencePair:
    return PreferencePair(p.prompt, p.rejected, p.chosen, p.margin, p.source)


# Gold rewards closer than this are a tie: SortWorld's r* reaches one value by different
# sums of fractions (0.9 vs 0.8999999999999999), which is no preference.
GOLD_TIE = 1e-6


def split_by_gold(pairs: Sequence[PreferencePair], gold) -> dict[str, list[PreferencePair]]:
    """{"agree", "disagree", "tie"}: pairs whose label the gold reward confirms, contradicts,
    or cannot decide (scores within GOLD_TIE)."""
    chosen, rejected = pair_scores(gold, pairs)
    out: dict[str, list[PreferencePair]] = {"agree": [], "disagree": [], "tie": []}
    for p, c, r in zip(pairs, chosen.tolist(), rejected.tolist()):
        out["tie" if abs(c - r) <= GOLD_TIE else "agree" if c > r else "disagree"].append(p)
    return out


def gold_oriented(pairs: Sequence[PreferencePair], gold) -> list[PreferencePair]:
    """The pairs relabelled by the gold reward (chosen = the higher r*), ties left out."""
    split = split_by_gold(pairs, gold)
    return split["agree"] + [_swap(p) for p in split["disagree"]]


def evaluation_sets(train: Sequence[PreferencePair], test_id: Sequence[PreferencePair] | None,
                    test_ood: Sequence[PreferencePair] | None, gold, limit: int = 0
                    ) -> tuple[dict[str, list[PreferencePair]], dict[str, int]]:
    """The sets of the module docstring (each cut to its first `limit` pairs when limit > 0;
    a held-out split that is None or empty is left out) and how many pairs each source had,
    ties included."""
    split = split_by_gold(train, gold)
    sets = {"train_clean": split["agree"], "train_noisy": split["disagree"]}
    counts = {"train": len(train), "train_gold_ties": len(split["tie"])}
    for name, pairs in (("test_id", test_id), ("test_ood", test_ood)):
        if pairs:
            sets[name] = gold_oriented(pairs, gold)
            counts[name] = len(pairs)
    if limit > 0:
        sets = {k: v[:limit] for k, v in sets.items()}
    return {k: v for k, v in sets.items() if v}, counts


def accuracies(reward, sets: dict[str, Sequence[PreferencePair]]) -> dict[str, float]:
    """Pairwise accuracy of `reward` on every set."""
    return {name: pair_accuracy(reward, pairs) for name, pairs in sets.items()}
