"""Preference data for reward models (and DPO): read pairs, tokenise them, batch them.

One JSONL record per line, either shape:
  {"prompt": "...", "chosen": "...", "rejected": "...", "margin": 0.5}     (margin optional)
  {"chosen": [messages...], "rejected": [messages...]}                     (chat form)
In chat form the prompt is the messages both sides share, and each side's last message is
its assistant answer; an explicit `"prompt": [messages...]` is accepted too.

A pair is rendered as the model saw conversations in SFT: with lmlab's role-token template
("lmlab"), a stored chat template (a directory or tokenizer_config.json), or "none" (plain
text: BOS + prompt + completion + EOS, for base models). Each side keeps its prompt length
(the first `prompt_len` real tokens are the prompt), so DPO can mask prompt tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from lmlab.data import IGNORE_INDEX
from lmlab.data.chat import JinjaTemplate, RoleTokenTemplate, conversation_from_record
from lmlab.errors import LmlabError
from lmlab.io import iter_jsonl

PLAIN = "none"
PADDING_SIDES = ("right", "left")



@dataclass(frozen=True)
class PreferenceDataConfig:
    """The `data:` section of reward-model and DPO recipes."""
    train: str = ""  # preference JSONL (in `lmlab run`: the world's preference pairs)
    val: str | None = None  # held-out preference JSONL: validation loss and accuracy
    val_fraction: float = 0.0  # without `val`: hold out this share of the training pairs (the last ones)
    template: str = "lmlab"  # lmlab | none | a directory / tokenizer_config.json with a chat_template
    seq_len: int | None = None  # longest sequence; default the model's context
    truncate: bool = False  # over-long pairs: refuse (false) or drop the start of the prompt (true)
    padding_side: str = "right"

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise LmlabError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str | tuple[dict[str, str], ...]  # text, or the shared chat messages
    chosen: str
    rejected: str
    margin: float | None = None
    source: str = "<memory>"  # file:line


@dataclass(frozen=True)
class PreferenceSet:
    pairs: list[PreferencePair]
    skipped_identical: int  # pairs whose chosen equals rejected: no signal, left out
    has_margin: bool


# ---------------------------------------------------------------------------------------
# Reading and validating
# ---------------------------------------------------------------------------------------


def _messages(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise LmlabError(f"{where} must be a non-empty list of {{role, content}} messages")
    return value


def _chat_pair(record: dict, source: str) -> tuple[tuple[dict[str, str], ...], str, str]:
    chosen = _messages(record["chosen"], f"{source}: 'chosen'")
    rejected = _messages(record["rejected"], f"{source}: 'rejected'")
    if "prompt" in record:
        prompt = _messages(record["prompt"], f"{source}: 'prompt'")
        # The sides may repeat the prompt (full conversations) or hold just the answer.
        if len(chosen) > len(prompt) and chosen[:len(prompt)] == prompt:
            chosen = chosen[len(prompt):]
        if len(rejected) > len(prompt) and rejected[:len(prompt)] == prompt:
            rejected = rejected[len(prompt):]
        if len(chosen) != 1 or len(rejected) != 1:
            raise LmlabError(f"{source}: with a 'prompt' list, 'chosen' and 'rejected' must each be one "
                             "assistant message (or the prompt followed by one)")
        chosen, rejected = prompt + chosen, prompt + rejected
    if len(chosen) != len(rejected) or chosen[:-1] != rejected[:-1]:
        raise LmlabError(f"{source}: 'chosen' and 'rejected' must be the same conversation up to their last "
                         "(assistant) message; give the shared part as 'prompt' if it differs")
    answers = []
    for side, conv in (("chosen", chosen), ("rejected", rejected)):
        # Full validation of roles and contents, by the chat reader's rules.
        clean = conversation_from_record({"messages": conv}, f"{source}: '{side}'").messages
        if clean[-1]["role"] != "assistant":
            raise LmlabError(f"{source}: the last message of '{side}' must be the assistant's answer")
        answers.append(clean[-1]["content"])
    shared = conversation_from_record({"messages": chosen}, source).messages[:-1]
    if not shared:
        raise LmlabError(f"{source}: the conversation has no prompt before the answers; start it with a user turn")
    return shared, answers[0], answers[1]


def pair_from_record(record: Any, source: str) -> PreferencePair:
    """Validate one JSON record into a PreferencePair; errors name `source`."""
    if not isinstance(record, dict):
        raise LmlabError(f"{source}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        raise LmlabError(f"{source}: a preference record needs 'chosen' and 'rejected' (and 'prompt' for text "
                         f"pairs); missing {missing}, found keys {sorted(record)}")
    if isinstance(record["chosen"], list) or isinstance(record["rejected"], list):
        prompt, chosen, rejected = _chat_pair(record, source)
    else:
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(record.get(key), str):
                raise LmlabError(f"{source}: '{key}' must be a string (or use the chat form: message lists)")
        prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
    margin = record.get("margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise LmlabError(f"{source}: 'margin' must be a finite number, got {margin!r}")
        margin = float(margin)
    return PreferencePair(prompt, chosen, rejected, margin, source)


def read_preference_jsonl(path: str | Path) -> PreferenceSet:
    """All pairs of a preference JSONL file. A malformed line is an error naming file:line;
    pairs with chosen == rejected are left out (counted), and a file with no usable pair
    is refused."""
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"preference data file not found: {path}")
    pairs, identical = [], 0
    for n, record in iter_jsonl(path):  # malformed, truncated or non-UTF-8 lines: file:line
        pair = pair_from_record(record, f"{path}:{n}")
        if pair.chosen == pair.rejected:
            identical += 1
        else:
            pairs.append(pair)
    if not pairs:
        if identical:
            raise LmlabError(f"{path}: chosen equals rejected in all {identical} pairs, so there is no preference "
                             "to learn; check how the file was built")
        raise LmlabError(f"{path} holds no preference pairs; expected JSONL lines with prompt/chosen/rejected")
    return PreferenceSet(pairs, identical, any(p.margin is not None for p in pairs))


# ---------------------------------------------------------------------------------------
# Tokenising
# ---------------------------------------------------------------------------------------


class PairEncoder:
    """(prompt, completion) -> (token ids, prompt length) with one template.

    template: "lmlab" (role tokens), "none" (plain text) or a path to a directory or
    tokenizer_config.json holding a stored chat_template."""

    def __init__(self, tokenizer, template: str = "lmlab") -> None:
        self.tokenizer, self.template_spec = tokenizer, template
        if template == PLAIN:
            self.template = None
        elif template == "lmlab":
            self.template = RoleTokenTemplate(tokenizer)
        else:
            self.template = JinjaTemplate.from_tokenizer_config(template, tokenizer)

    def encode(self, prompt: str | Sequence[dict[str, str]], completion: str,
               source: str = "<memory>") -> tuple[list[int], int]:
        tok = self.tokenizer
        if self.template is None:
            if not isinstance(prompt, str):
                raise LmlabError(f"{source}: chat-form pairs need a chat template (data.template: lmlab or a "
                                 "tokenizer_config.json), not 'none'")
            head = ([tok.bos_id] if tok.bos_id is not None else []) + list(tok.encode(prompt))
            tail = list(tok.encode(completion)) + ([tok.eos_id] if tok.eos_id is not None else [])
            return head + tail, len(head)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        conv = conversation_from_record({"messages": messages + [{"role": "assistant", "content": completion}]},
                                        source)
        example = self.template.encode(conv)
        return list(example.ids), answer_start(example.labels, source)


def answer_start(labels: Sequence[int], source: str) -> int:
    """Where the final trained run (the last assistant answer) begins: everything before
    it, earlier turns included, is prompt."""
    end = max((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), default=None)
    if end is None:
        raise LmlabError(f"{source}: the template marked no answer token; check the chat template")
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def fit_to_context(ids: list[int], prompt_len: int, max_len: int, truncate: bool,
                   source: str) -> tuple[list[int], int]:
    """Refuse a sequence longer than `max_len`, or with `truncate` drop its oldest tokens
    (the start of the prompt), so the answer and its end, where the score is read, stay."""
    if len(ids) <= max_len:
        return ids, prompt_len
    if not truncate:
        raise LmlabError(f"{source}: {len(ids)} tokens exceed the context of {max_len}; shorten the pair, raise "
                         "data.seq_len up to the model's context, or set data.truncate: true (drops the start "
                         "of the prompt)")
    cut = len(ids) - max_len
    return ids[cut:], max(0, prompt_len - cut)


@dataclass(frozen=True)
class PreferenceExample:
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    chosen_prompt_len: int
    rejected_prompt_len: int
    margin: float
    source: str
    # Identifies the example across every dataset of a run (train and validation alike):
    # what DPO's reference log-prob cache is keyed by.
    index: int = 0


def encode_pairs(pairs: Sequence[PreferencePair], encoder: PairEncoder, max_len: int,
                 truncate: bool = False, first_index: int = 0) -> list[PreferenceExample]:
    """Tokenised pairs numbered `first_index`, `first_index + 1`, ... (give a validation
    set indices after the training set's)."""
    out = []
    for n, p in enumerate(pairs):
        sides = []
        for completion in (p.chosen, p.rejected):
            ids, plen = encoder.encode(p.prompt, completion, p.source)
            sides.append(fit_to_context(ids, plen, max_len, truncate, p.source))
        (c, cp), (r, rp) = sides
        out.append(PreferenceExample(tuple(c), tuple(r), cp, rp, p.margin or 0.0, p.source, first_index + n))
    return out


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right",
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, W) ids and bool validity, each row padded on `side` to `width` (default: longest)."""
    if side not in PADDING_SIDES:
        raise LmlabError(f"padding side must be one of {PADDING_SIDES}, got {side!r}")
    width = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        n = len(row)
        sl = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, sl] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, sl] = True
    return ids, mask


class PreferenceCollator:
    """Examples -> {chosen_ids, chosen_mask, rejected_ids, rejected_mask, chosen_prompt_len,
    rejected_prompt_len, index[, margin]}; both sides padded to one width, so the objective runs
    them as one batch."""

    def __init__(self, pad_id: int, padding_side: str = "right", with_margin: bool = False) -> None:
        if padding_side not in PADDING_SIDES:
            raise LmlabError(f"data.padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        self.pad_id, self.side, self.with_margin = pad_id, padding_side, with_margin

    def __call__(self, items: Sequence[PreferenceExample]) -> dict[str, torch.Tensor]:
        width = max(max(len(e.chosen_ids), len(e.rejected_ids)) for e in items)
        c_ids, c_mask = pad_rows([e.chosen_ids for e in items], self.pad_id, self.side, width)
        r_ids, r_mask = pad_rows([e.rejected_ids for e in items], self.pad_id, self.side, width)
        batch = {"chosen_ids": c_ids, "chosen_mask": c_mask, "rejected_ids": r_ids, "rejected_mask": r_mask,
                 "chosen_prompt_len": torch.tensor([e.chosen_prompt_len for e in items]),
                 "rejected_prompt_len": torch.tensor([e.rejected_prompt_len for e in items]),
                 "index": torch.tensor([e.index for e in items], dtype=torch.int64)}
        if self.with_margin:
            batch["margin"] = torch.tensor([e.margin for e in items], dtype=torch.float32)
        return batch


class PreferenceDataset(torch.utils.data.Dataset):
    def __init__(self, examples: Sequence[PreferenceExample]) -> None:
        if not examples:
            raise LmlabError("the preference dataset is empty; give at least one pair")
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PreferenceExample:
        return self.examples[i]


def pad_id_of(tokenizer) -> int:
    """The id padding is written with (any id works: the mask hides it)."""
    for value in (tokenizer.pad_id, tokenizer.eos_id):
        if value is not None:
            return value
    return 0
