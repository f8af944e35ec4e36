"""A world's held-out prompts answered greedily and scored: SortWorld's gold reward (dense,
and sparse = exact sorted answer that ended), FactWorld's exact match against the
reference answer. The pipeline's eval stage and `lmlab eval gold` both run this.

Rows are a world's `eval.jsonl`: {"prompt", "base_prompt"} (SortWorld) or
{"prompt", "answer", "base_prompt"} (FactWorld). `prompt` is the user turn for a chat
model, `base_prompt` the same question in the pretraining corpus's format.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

from lmlab.errors import LmlabError
from lmlab.io import iter_jsonl

PROMPT_FORMATS = ("chat", "base")


def read_eval_rows(path: str | Path) -> list[dict]:
    """A world's eval.jsonl (or the world directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "eval.jsonl"
    if not path.is_file():
        raise LmlabError(f"{path} not found: pass a world directory (lmlab world export) or its eval.jsonl")
    rows = []
    for lineno, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise LmlabError(f"{path}:{lineno}: each row needs a text 'prompt' (a world's eval.jsonl)")
        rows.append(row)
    if not rows:
        raise LmlabError(f"{path} holds no prompts")
    return rows


def answer_prompts(model, tokenizer, prompts: Sequence[str], *, template=None, max_new_tokens: int = 32,
                   precision=None, batch_size: int = 64, temperature: float = 0.0,
                   seed: int | None = None) -> tuple[list[str], list[str]]:
    """Answers (greedy unless `temperature` > 0) and finish reasons. With a chat `template` (RoleTokenTemplate or
    JinjaTemplate) each prompt is a user turn and the answer ends at the template's stop
    token; without one the prompt is plain text (BOS as the tokenizer adds it) ending at EOS."""
    from lmlab.decode.generate import generate
    from lmlab.eval.scoring import encode_text

    if template is not None:
        ids = [template.encode_prompt([{"role": "user", "content": p}]) for p in prompts]
        stops = template.stop_ids
        eos = stops[0] if stops else tokenizer.eos_id
    else:
        ids = [encode_text(tokenizer, p) for p in prompts]
        eos = tokenizer.eos_id
    answers, reasons = [], []
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        import torch

        with torch.no_grad(), autocast:
            for s in range(0, len(ids), batch_size):
                for o in generate(model, ids[s:s + batch_size], max_new_tokens, eos_id=eos,
                                  temperature=temperature, seed=None if seed is None else seed + s):
                    answers.append(tokenizer.decode(o.tokens[:-1] if o.finish_reason == "eos" else o.tokens))
                    reasons.append(o.finish_reason)
    finally:
        model.train(was_training)
    return answers, reasons


def world_scores(rows: Sequence[dict], answers: Sequence[str], finish_reasons: Sequence[str]) -> dict[str, float]:
    """Mean scores of the answers: exact match against each row's "answer" where the rows
    have one (FactWorld); else SortWorld's gold reward, whose sparse form is its exact match."""
    from lmlab.worlds.evaluate import exact_match, sort_rewards

    if all("answer" in r for r in rows):
        return {"exact_match": exact_match(list(answers), [str(r["answer"]) for r in rows])}
    if any("answer" in r for r in rows):
        raise LmlabError("some eval rows have an 'answer' and some do not; use one world's eval.jsonl")
    rewards = sort_rewards([r["prompt"] for r in rows], list(answers), list(finish_reasons))
    n = len(rows)
    dense, sparse = sum(rewards["gold_dense"]) / n, sum(rewards["gold_sparse"]) / n
    return {"gold_reward_dense": dense, "gold_reward_sparse": sparse, "exact_match": sparse}


def world_eval(model, tokenizer, rows: Sequence[dict], *, prompt_format: str = "chat", template=None,
               max_new_tokens: int = 32, precision=None, limit: int | None = None, examples: int = 5) -> dict:
    """Answer `rows` (a world's eval rows) and score them; `prompt_format` "chat" wraps
    `prompt` in the chat template (lmlab's role tokens unless `template` is given), "base"
    feeds `base_prompt` as plain text."""
    if prompt_format not in PROMPT_FORMATS:
        raise LmlabError(f"prompt format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    rows = list(rows[:limit] if limit else rows)
    if prompt_format == "chat":
        if template is None:
            from lmlab.data.chat import RoleTokenTemplate

            template = RoleTokenTemplate(tokenizer)
        prompts = [r["prompt"] for r in rows]
    else:
        missing = [i for i, r in enumerate(rows) if not isinstance(r.get("base_prompt"), str)]
        if missing:
            raise LmlabError(f"row {missing[0]} has no 'base_prompt'; use the chat prompt format")
        prompts, template = [r["base_prompt"] for r in rows], None
    answers, reasons = answer_prompts(model, tokenizer, prompts, template=template,
                                      max_new_tokens=max_new_tokens, precision=precision)
    scores = world_scores(rows, answers, reasons)
    return {"generated": len(rows), "prompt_format": prompt_format,
            "precision": precision.name if precision is not None else "float32", **scores,
            "examples": [{"prompt": p, "answer": a} for p, a in list(zip(prompts, answers))[:examples]]}


def sampled_kl(policy, reference, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, stop: int | None,
               pad: int, seed: int = 0) -> float:
    """KL(policy || reference) over answers, estimated from the policy's own samples at
    temperature 1: the mean over prompts of the summed per-token log-ratio (k1), unbiased."""
    import torch

    from lmlab.decode.generate import generate
    from lmlab.train.logprobs import masked_logprobs
    from lmlab.train.rollout import layout

    with torch.no_grad():
        sampled = generate(policy, [list(p) for p in prompt_ids], max_new_tokens, temperature=1.0, eos_id=stop,
                           pad_id=pad, seed=seed)
        batch = layout(prompt_ids, [g.tokens for g in sampled], pad)
        device = next(policy.parameters()).device
        ids, targets = batch["input_ids"].to(device), batch["targets"].to(device)
        a = masked_logprobs(policy, ids, targets)
        b = masked_logprobs(reference, ids, targets)
    return float((a.sums - b.sums).mean())
