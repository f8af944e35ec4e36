"""Pairwise win rate of two policies judged by a `Reward` (lmlab.rewards.base).

Both policies answer the same prompts; the reward scores each answer; on every prompt A
wins (1), ties (1/2) or loses (0) against B:
    win_rate = (wins + ties / 2) / prompts
so a policy against itself scores exactly 0.5. The standard error is that of the mean of
the per-prompt outcomes (sample standard deviation / sqrt(n)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lmlab.errors import LmlabError


@dataclass
class Policy:
    """A model that answers prompts: its tokenizer and chat template (None: plain text)."""
    model: Any
    tokenizer: Any
    template: Any = None
    name: str = "policy"

    @classmethod
    def from_dir(cls, path, device: str = "cpu", prompt_format: str = "chat") -> "Policy":
        from pathlib import Path

        from lmlab.hub import load_model
        from lmlab.serve.server import chat_template_for
        from lmlab.tokenizer import Tokenizer

        tok = Tokenizer.load(path)
        template = chat_template_for(path, tok) if prompt_format == "chat" else None
        if prompt_format == "chat" and template is None:
            raise LmlabError(f"{path} has no chat template (no role tokens, no stored chat_template); "
                             "use --prompt-format base")
        return cls(load_model(path, device=device).eval(), tok, template, Path(path).name)


def pairwise(scores_a: Sequence[float], scores_b: Sequence[float], tie_margin: float = 0.0) -> dict[str, float]:
    """Wins, ties and losses of A against B (a tie: |a - b| <= tie_margin) and the win rate
    with ties counted half."""
    if len(scores_a) != len(scores_b) or not scores_a:
        raise LmlabError(f"win rate needs one score per prompt from each policy, got {len(scores_a)} and "
                         f"{len(scores_b)} (at least one)")
    if tie_margin < 0:
        raise LmlabError(f"tie margin must be >= 0, got {tie_margin}")
    outcomes = []
    for a, b in zip(scores_a, scores_b):
        a, b = float(a), float(b)
        outcomes.append(0.5 if abs(a - b) <= tie_margin else float(a > b))
    n = len(outcomes)
    rate = sum(outcomes) / n
    var = sum((o - rate) ** 2 for o in outcomes) / (n - 1) if n > 1 else float("nan")
    return {"prompts": n, "wins": sum(o == 1.0 for o in outcomes), "ties": sum(o == 0.5 for o in outcomes),
            "losses": sum(o == 0.0 for o in outcomes), "win_rate": rate,
            "win_rate_stderr": math.sqrt(var / n) if n > 1 else float("nan")}


def judged_texts(reward, answers: Sequence[str], finish_reasons: Sequence[str]) -> list[str]:
    """What the reward reads. A world's gold reward that looks for the END marker in the text
    is told which answers ended (the stop token itself is not in the decoded answer); a
    reward model reads the plain answer, which its template closes as a finished turn."""
    from lmlab.rewards.base import GoldReward
    from lmlab.worlds.evaluate import ended_from_finish_reason
    from lmlab.worlds.sort import END

    if isinstance(reward, GoldReward) and reward.ended is None:
        return [a + END if ended_from_finish_reason(r) else a for a, r in zip(answers, finish_reasons)]
    return list(answers)


def policy_scores(policy: Policy, prompts: Sequence[str], reward, *, max_new_tokens: int = 32,
                  temperature: float = 0.0, seed: int | None = None, precision=None) -> tuple[torch.Tensor, list[str]]:
    from lmlab.eval.gold import answer_prompts

    answers, reasons = answer_prompts(policy.model, policy.tokenizer, prompts, template=policy.template,
                                      max_new_tokens=max_new_tokens, precision=precision,
                                      temperature=temperature, seed=seed)
    scores = reward.score(list(prompts), judged_texts(reward, answers, reasons))
    return torch.as_tensor(scores, dtype=torch.float32).reshape(-1), answers


def win_rate(policy_a: Policy, policy_b: Policy, prompts: Sequence[str], reward, *, max_new_tokens: int = 32,
             temperature: float = 0.0, seed: int | None = None, precision=None, tie_margin: float = 0.0,
             examples: int = 3) -> dict:
    """A's win rate against B on `prompts`, judged by `reward`; greedy answers unless a
    temperature is given (then both sample with the same `seed`)."""
    prompts = list(prompts)
    if not prompts:
        raise LmlabError("win rate needs at least one prompt")
    opts = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, precision=precision)
    sa, answers_a = policy_scores(policy_a, prompts, reward, **opts)
    sb, answers_b = policy_scores(policy_b, prompts, reward, **opts)
    result = pairwise(sa.tolist(), sb.tolist(), tie_margin)
    return {"a": policy_a.name, "b": policy_b.name, **result,
            "mean_reward_a": float(sa.mean()), "mean_reward_b": float(sb.mean()),
            "examples": [{"prompt": p, "a": a, "b": b} for p, a, b in
                         list(zip(prompts, answers_a, answers_b))[:examples]]}
