"""Multiple choice by log-likelihood, as lm-eval scores its `multiple_choice` tasks.

A task file is JSONL, one question a line:
    {"query": "The capital of France is", "choices": ["Paris", "Rome"], "gold": 0}
("context" may stand for "query"). Each choice is scored as the continuation
`delimiter + choice` (lm-eval's target_delimiter, " " by default) of the query:
    acc      = share of questions whose highest log p(choice | query) is the gold one
    acc_norm = the same with log p divided by the choice's length in characters
               (lm-eval's acc_norm: `len(choice)`, the delimiter not counted)
Ties go to the first choice, as numpy's argmax does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from torch import nn

from lmlab.errors import LmlabError
from lmlab.io import iter_jsonl
from lmlab.eval.scoring import encode_pair, score_pairs


@dataclass(frozen=True)
class Question:
    query: str
    choices: tuple[str, ...]
    gold: int


def question_from_record(record, source: str) -> Question:
    if not isinstance(record, dict):
        raise LmlabError(f"{source}: expected a JSON object with query, choices and gold")
    query = record.get("query", record.get("context"))
    choices, gold = record.get("choices"), record.get("gold")
    if not isinstance(query, str):
        raise LmlabError(f"{source}: needs a text field 'query' (or 'context'), found keys {sorted(record)}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise LmlabError(f"{source}: 'choices' must be a list of at least two non-empty texts")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise LmlabError(f"{source}: 'gold' must be the index of the right choice, 0..{len(choices) - 1}, got {gold!r}")
    return Question(query, tuple(choices), gold)


def read_task(path: str | Path) -> list[Question]:
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"task file not found: {path}")
    out = []
    for lineno, record in iter_jsonl(path):
        out.append(question_from_record(record, f"{path}:{lineno}"))
    if not out:
        raise LmlabError(f"{path} holds no questions")
    return out


def argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def question_metrics(loglikelihoods: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc and acc_norm of one question from its choices' log-likelihoods."""
    pred = argmax(loglikelihoods)
    pred_norm = argmax([lp / len(c) for lp, c in zip(loglikelihoods, choices)])
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold), "pred": pred, "pred_norm": pred_norm}


def multiple_choice(model: nn.Module, tokenizer, questions: Sequence[Question], *, delimiter: str = " ",
                    add_special_tokens: bool = True, batch_size: int = 16, precision=None) -> dict:
    """acc and acc_norm (with standard errors) over `questions`, and per-question details.

    add_special_tokens: encode the query as the checkpoint's tokenizer does (BOS for lmlab's
        own); False scores the bare text, as lm-eval does with add_bos_token=False."""
    if not questions:
        raise LmlabError("no questions to score")
    pairs, owner = [], []
    for qi, q in enumerate(questions):
        for c in q.choices:
            pairs.append(encode_pair(tokenizer, q.query, delimiter + c, add_special_tokens))
            owner.append(qi)
    scores = score_pairs(model, pairs, batch_size=batch_size, precision=precision)
    per = [[] for _ in questions]
    for qi, (logp, _) in zip(owner, scores):
        per[qi].append(logp)
    details = [{"gold": q.gold, "loglikelihoods": lls, **question_metrics(lls, q.choices, q.gold)}
               for q, lls in zip(questions, per)]
    n = len(details)
    result = {"questions": n, "precision": precision.name if precision is not None else "float32",
              "chance": sum(1 / len(q.choices) for q in questions) / n}
    for key in ("acc", "acc_norm"):
        mean = sum(d[key] for d in details) / n
        result[key] = mean
        # lm-eval's stderr of a mean: the sample standard deviation over sqrt(n).
        result[f"{key}_stderr"] = math.sqrt(mean * (1 - mean) / (n - 1)) if n > 1 else float("nan")
    result["details"] = details
    return result
