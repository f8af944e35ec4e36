"""Chat data for supervised fine-tuning: read conversations, render them with a chat
template into token ids with loss only on the assistant's answers, and pack several
conversations into one sequence with document ids so none attends to another.

Two record shapes per JSONL line:
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  {"prompt": "...", "response": "..."}            (optionally "system": "...")

Two templates:
  `RoleTokenTemplate` (ours): <|role|> content <|end|> per message, using the tokenizer's
      special role tokens; the model learns to close every answer with <|end|>.
  `JinjaTemplate`: a real tokenizer's stored `chat_template` (tokenizer_config.json).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import torch

from lmlab.data import IGNORE_INDEX, PAD_DOC
from lmlab.errors import LmlabError
from lmlab.io import iter_jsonl, read_json

ROLES = ("system", "user", "assistant")


class TokenizerLike(Protocol):
    """What chat encoding needs from `lmlab.tokenizer.Tokenizer`."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def token_to_id(self, token: str) -> int | None: ...


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict[str, str], ...]
    source: str = "<memory>"  # "file:line" for error messages


# ---------------------------------------------------------------------------------------
# Reading and validating
# ---------------------------------------------------------------------------------------


def conversation_from_record(record: Any, source: str) -> Conversation:
    """Validate one JSON record (either shape) into a Conversation; errors name `source`."""
    if not isinstance(record, dict):
        raise LmlabError(f"{source}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise LmlabError(f"{source}: 'messages' must be a non-empty list of {{role, content}} objects")
    elif "prompt" in record and "response" in record:
        messages = ([{"role": "system", "content": record["system"]}] if record.get("system") else [])
        messages += [{"role": "user", "content": record["prompt"]},
                     {"role": "assistant", "content": record["response"]}]
    else:
        raise LmlabError(
            f"{source}: a chat record needs 'messages' or both 'prompt' and 'response' "
            f"(found keys {sorted(record)})"
        )
    clean = []
    for i, msg in enumerate(messages):
        where = f"{source}: message {i}"
        if not isinstance(msg, dict):
            raise LmlabError(f"{where} must be an object with 'role' and 'content'")
        if "role" not in msg:
            raise LmlabError(f"{where} has no 'role'; add one of {', '.join(ROLES)}")
        role = msg["role"]
        if role not in ROLES:
            raise LmlabError(f"{where} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        content = msg.get("content")
        if not isinstance(content, str):
            raise LmlabError(f"{where} ({role}) needs a string 'content'")
        if role == "assistant" and not content.strip():
            raise LmlabError(f"{where}: empty assistant answer; remove the record or write the answer")
        if role == "system" and i != 0:
            raise LmlabError(f"{where}: a system message may only come first")
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise LmlabError(f"{source}: no assistant message, so nothing to learn from; add the answer")
    return Conversation(tuple(clean), source)


def read_chat_jsonl(path: str | Path) -> list[Conversation]:
    path = Path(path)
    if not path.exists():
        raise LmlabError(f"chat data file not found: {path}")
    conversations = []
    for n, record in iter_jsonl(path):  # malformed, truncated or non-UTF-8 lines: file:line
        conversations.append(conversation_from_record(record, f"{path}:{n}"))
    if not conversations:
        raise LmlabError(f"{path} holds no conversations")
    return conversations


# ---------------------------------------------------------------------------------------
# Templates: a conversation -> [(text or ids, trained?)] segments
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """Token ids of one conversation; `labels[i]` is ids[i] where the model must learn to
    produce that token (assistant answers and their end marker), IGNORE_INDEX elsewhere."""

    ids: tuple[int, ...]
    labels: tuple[int, ...]
    source: str


class RoleTokenTemplate:
    """<|bos|> then, per message, <|role|> content <|end|>; an answer's content and its
    <|end|> are trained. A prompt for generation ends with <|assistant|>."""

    def __init__(self, tokenizer: TokenizerLike) -> None:
        self.tokenizer = tokenizer
        self.role_ids = {r: self._special(f"<|{r}|>") for r in ROLES}
        self.end_id = self._special("<|end|>")

    def _special(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise LmlabError(
                f"the tokenizer has no {token} token; train it with lmlab's special tokens "
                "or use a tokenizer with a stored chat_template"
            )
        return tid

    def _bos(self) -> list[int]:
        bos = self.tokenizer.bos_id
        return [bos] if bos is not None else []

    def encode(self, conv: Conversation) -> Example:
        ids, labels = self._bos(), [IGNORE_INDEX] * len(self._bos())
        for msg in conv.messages:
            content = self.tokenizer.encode(msg["content"])
            ids.append(self.role_ids[msg["role"]])
            labels.append(IGNORE_INDEX)
            ids += content + [self.end_id]
            trained = msg["role"] == "assistant"
            labels += (content + [self.end_id]) if trained else [IGNORE_INDEX] * (len(content) + 1)
        return Example(tuple(ids), tuple(labels), conv.source)

    def encode_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Ids of a conversation so far followed by <|assistant|>: what generation continues."""
        ids = self._bos()
        for msg in messages:
            ids += [self.role_ids[msg["role"]], *self.tokenizer.encode(msg["content"]), self.end_id]
        return ids + [self.role_ids["assistant"]]

    @property
    def stop_ids(self) -> list[int]:
        return [self.end_id]


def find_chat_template(path: str | Path, config: dict | None = None) -> str | None:
    """The chat template stored at `path` (a checkpoint directory, `chat_template.jinja`, or
    `tokenizer_config.json`): the .jinja file wins, as in transformers; else the config's
    `chat_template` (a string, or a list of named templates of which "default" is used)."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    if path.suffix == ".jinja" and path.is_file():
        return path.read_text(encoding="utf-8")
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if config is None:
        config_path = directory / "tokenizer_config.json"
        config = read_json(config_path, "") if config_path.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template or None


class JinjaTemplate:
    """A Hugging Face chat template. Answers are found by rendering prefixes: the text an
    assistant turn adds after `add_generation_prompt=True` is that turn's trained text."""

    def __init__(self, template: str, tokenizer: TokenizerLike, bos_token: str = "",
                 eos_token: str = "") -> None:
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:  # pragma: no cover - jinja2 is a core dependency
            raise LmlabError("rendering a stored chat_template needs jinja2: pip install jinja2") from None

        def raise_exception(message: str):
            raise LmlabError(f"chat template refused the conversation: {message}")

        class Sandbox(ImmutableSandboxedEnvironment):
            # Jinja's sandbox turns an unsafe attribute (__class__, __globals__, ...) into an
            # undefined value that fails only when used further; refuse it at once instead,
            # so a template probing for Python internals is an error, never a silent "".
            def unsafe_undefined(self, obj, attribute):
                raise LmlabError(
                    f"chat template refused: it reaches for {attribute!r} of a {type(obj).__name__}, "
                    "which the sandbox forbids; this template is not a plain chat template, do not use it"
                )

        env = Sandbox(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self._template_errors = (jinja2.TemplateError,)
        try:
            self.template = env.from_string(template)
        except jinja2.TemplateError as e:
            raise LmlabError(f"the chat template does not parse ({e}); fix it or use lmlab's template") from None
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_tokenizer_config(cls, path: str | Path, tokenizer: TokenizerLike) -> "JinjaTemplate":
        """The template stored with a checkpoint: `chat_template.jinja` (what current
        transformers writes) or the `chat_template` of `tokenizer_config.json`; `path` is
        the checkpoint directory or either file."""
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        config_path = directory / "tokenizer_config.json"
        config = read_json(config_path, "") if config_path.is_file() else {}
        template = find_chat_template(path, config)
        if not template:
            raise LmlabError(f"{directory} has no chat template (neither chat_template.jinja nor a chat_template "
                             "in tokenizer_config.json); use lmlab's template (template: lmlab)")

        def token_text(value: Any) -> str:
            return value.get("content", "") if isinstance(value, dict) else (value or "")

        return cls(template, tokenizer, token_text(config.get("bos_token")), token_text(config.get("eos_token")))

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        try:
            return self.template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except self._template_errors as e:  # SecurityError included: the sandbox said no
            raise LmlabError(f"the chat template failed to render ({type(e).__name__}: {e}); "
                             "fix it or use lmlab's template") from None

    def encode(self, conv: Conversation) -> Example:
        ids: list[int] = []
        labels: list[int] = []
        done = ""  # text already turned into ids

        def add(text: str, trained: bool) -> None:
            piece = self.tokenizer.encode(text)
            ids.extend(piece)
            labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))

        for i, msg in enumerate(conv.messages):
            if msg["role"] != "assistant":
                continue
            prompt = self.render(conv.messages[:i], add_generation_prompt=True)
            full = self.render(conv.messages[: i + 1])
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise LmlabError(
                    f"{conv.source}: this chat template does not render conversations "
                    "incrementally, so answer tokens cannot be located; use lmlab's template"
                )
            add(prompt[len(done):], trained=False)
            answer = full[len(prompt):]
            # Separator text a template emits after the answer's end token belongs to the
            # next turn: the model should learn to stop at the end token, not after it.
            end = answer.rfind(self.eos_token) if self.eos_token else -1
            cut = end + len(self.eos_token) if end >= 0 else len(answer)
            add(answer[:cut], trained=True)
            add(answer[cut:], trained=False)
            done = full
        add(self.render(conv.messages)[len(done):], trained=False)
        return Example(tuple(ids), tuple(labels), conv.source)

    def encode_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.tokenizer.encode(self.render(messages, add_generation_prompt=True))

    @property
    def stop_ids(self) -> list[int]:
        return [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []


def encode_conversations(conversations: Iterable[Conversation], template, max_len: int,
                         vocab_size: int | None = None) -> list[Example]:
    """Encode and check that every conversation fits `max_len` (the model's context) and,
    given the model's `vocab_size`, that every token id has a row in its embedding."""
    examples = []
    for conv in conversations:
        ex = template.encode(conv)
        if vocab_size is not None and ex.ids and not 0 <= min(ex.ids) <= max(ex.ids) < vocab_size:
            bad = next(i for i in ex.ids if not 0 <= i < vocab_size)
            raise LmlabError(
                f"{conv.source}: token id {bad} is outside the model's vocabulary of {vocab_size}; "
                "the tokenizer does not belong to this model: use the one it was trained with"
            )
        # Training reads ids[:-1] as inputs, so a conversation of max_len + 1 ids still fits.
        if len(ex.ids) - 1 > max_len:
            raise LmlabError(
                f"{conv.source}: conversation is {len(ex.ids)} tokens, longer than the context "
                f"of {max_len}; shorten or split it, or raise the context length"
            )
        if not any(label != IGNORE_INDEX for label in ex.labels[1:]):
            raise LmlabError(f"{conv.source}: no trainable answer token after encoding")
        examples.append(ex)
    return examples


# ---------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------


def pack_examples(examples: Sequence[Example], seq_len: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Greedily fill rows of `seq_len` positions with (input, target) pairs of whole
    conversations, in order. Returns LongTensors (N, seq_len): `input_ids`, `targets`
    (IGNORE_INDEX where no loss), `doc_ids` (0, 1, ... per conversation in a row; padding is
    PAD_DOC, a document of its own, so it attends only to padding)."""
    rows: list[tuple[list[int], list[int], list[int]]] = []
    current: tuple[list[int], list[int], list[int]] = ([], [], [])
    for ex in examples:
        inputs, targets = list(ex.ids[:-1]), list(ex.labels[1:])
        if len(inputs) > seq_len:
            raise LmlabError(f"{ex.source}: {len(inputs) + 1} tokens do not fit a sequence of {seq_len}")
        if len(current[0]) + len(inputs) > seq_len:
            rows.append(current)
            current = ([], [], [])
        doc = current[2][-1] + 1 if current[2] else 0
        current[0].extend(inputs)
        current[1].extend(targets)
        current[2].extend([doc] * len(inputs))
    if current[0]:
        rows.append(current)
    n = len(rows)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    doc_ids = torch.empty((n, seq_len), dtype=torch.long)
    for i, (inp, tgt, doc) in enumerate(rows):
        k = len(inp)
        input_ids[i, :k] = torch.tensor(inp)
        targets[i, :k] = torch.tensor(tgt)
        doc_ids[i, :k] = torch.tensor(doc)
        doc_ids[i, k:] = PAD_DOC
    return {"input_ids": input_ids, "targets": targets, "doc_ids": doc_ids}


def one_per_row(examples: Sequence[Example], seq_len: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """No packing: each conversation in its own right-padded row."""
    rows = [pack_examples([ex], seq_len, pad_id) for ex in examples]
    return {k: torch.cat([r[k] for r in rows]) for k in ("input_ids", "targets", "doc_ids")}


def collate_rows(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack dataset rows into a batch (for batch sources that take a collate function),
    with the rotary `positions` and the `attn_mask` its document ids imply: attention stays
    inside a conversation and positions restart at 0, so the language-modelling objective
    reads a packed chat batch like any other."""
    batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}
    return with_document_masks(batch)


def with_document_masks(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`batch` plus `positions` and `attn_mask` from its `doc_ids`."""
    from lmlab.model.masks import document_causal_mask, document_positions

    doc_ids = batch["doc_ids"]
    return {**batch, "positions": document_positions(doc_ids), "attn_mask": document_causal_mask(doc_ids)}


class ChatDataset(torch.utils.data.Dataset):
    """Rows of a packed chat tensor dict; the default collate stacks them into a batch."""

    def __init__(self, rows: dict[str, torch.Tensor]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return self.rows["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.rows.items()}


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """The prompts of a JSONL file, in order (the first `limit`): each record's `prompt`
    string, or a chat record's first user turn; a line without one is an error naming
    file:line, and so is a file with none."""
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"prompt file not found: {path}")
    out: list[str] = []
    for n, record in iter_jsonl(path):
        if limit is not None and len(out) >= limit:
            break
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if prompt is None and isinstance(record, dict) and isinstance(record.get("messages"), list):
            prompt = next((m.get("content") for m in record["messages"]
                           if isinstance(m, dict) and m.get("role") == "user"), None)
        if not isinstance(prompt, str) or not prompt.strip():
            raise LmlabError(f"{path}:{n}: needs a string 'prompt' or 'messages' with a user turn")
        out.append(prompt)
    if not out:
        raise LmlabError(f"{path} holds no prompts")
    return out
