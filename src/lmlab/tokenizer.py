"""Tokenizers: train a byte-level BPE, or load a real checkpoint's tokenizer.json or
sentencepiece model, behind one small interface."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from lmlab.errors import LmlabError
from lmlab.io import atomic_path, check_output_file, read_json

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>", "end": "<|end|>"}
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_TOKENS.values()]
# Names real checkpoints use, tried in order when no tokenizer_config.json says otherwise.
KNOWN_BOS = (BOS, "<s>", "<|begin_of_text|>", "<|startoftext|>")
KNOWN_EOS = (EOS, "</s>", "<|end_of_text|>", "<|endoftext|>", "<|eot_id|>")
KNOWN_PAD = (PAD, "<pad>", "<|pad|>", "<unk>")


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` ("hf") or a `sentencepiece.SentencePieceProcessor` ("spm")."""

    def __init__(self, backend, kind: str, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None, add_bos: bool = False, add_eos: bool = False) -> None:
        self.backend, self.kind = backend, kind
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        # What the checkpoint's own tokenizer adds around a text (its tokenizer_config.json
        # flags, else its post-processor): `encode(..., add_special_tokens=True)` follows it.
        self.add_bos, self.add_eos = add_bos and bos_id is not None, add_eos and eos_id is not None
        self.role_ids = {role: self.token_to_id(tok) for role, tok in ROLE_TOKENS.items()}

    # ---- basic interface --------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        if self.kind == "spm":
            return self.backend.get_piece_size()
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        if self.kind == "spm":
            i = self.backend.piece_to_id(token)
            return None if i == self.backend.unk_id() and token != self.backend.id_to_piece(i) else i
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False,
               add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. `add_special_tokens=True` adds BOS/EOS exactly as the
        checkpoint's tokenizer does (what transformers' default encode gives)."""
        ids = self.encode_batch([text])[0]
        if add_special_tokens:
            add_bos, add_eos = add_bos or self.add_bos, add_eos or self.add_eos
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once; both backends spread the work over all cores."""
        if self.kind == "spm":
            return self.backend.encode(list(texts))
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self.bos_id is None:
                raise LmlabError("this tokenizer has no BOS token; encode with add_bos=False")
            ids = [self.bos_id] + ids
        if add_eos:
            if self.eos_id is None:
                raise LmlabError("this tokenizer has no EOS token; encode with add_eos=False")
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "spm":
            if skip_special:
                ids = [i for i in ids if not self.backend.is_control(i)]
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    # ---- persistence ------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """tokenizer.json for BPE; the serialized model proto for sentencepiece. Written
        atomically; an existing file that is not a tokenizer is refused unless `overwrite`."""
        check_output_file(path, overwrite=overwrite, is_ours=is_tokenizer_file, what="tokenizer file")
        with atomic_path(path) as tmp:
            if self.kind == "spm":
                tmp.write_bytes(self.backend.serialized_model_proto())
            else:
                self.backend.save(str(tmp))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """A tokenizer.json (ours or a real checkpoint's), a sentencepiece .model, or a
        directory holding one of them."""
        path = Path(path)
        if path.is_dir():
            for name in ("tokenizer.json", "tokenizer.model"):
                if (path / name).is_file():
                    return cls.load(path / name)
            raise LmlabError(f"no tokenizer.json or tokenizer.model in {path}")
        if not path.is_file():
            raise LmlabError(f"tokenizer file not found: {path}")
        head = path.read_bytes()[:1]
        if head == b"{":
            return _load_hf(path)
        return _load_spm(path)


def is_tokenizer_file(path: str | Path) -> bool:
    """Whether `path` loads as a tokenizer (so replacing it loses no one's other data)."""
    try:
        Tokenizer.load(path)
    except LmlabError:
        return False
    return True


def check_vocab_fits(tokenizer_vocab: int, model_vocab: int, where: str = "the model") -> None:
    """A tokenizer with more tokens than the model's embedding would index past it."""
    if tokenizer_vocab > model_vocab:
        raise LmlabError(
            f"the tokenizer has {tokenizer_vocab} tokens but {where} has a vocabulary of {model_vocab}; "
            "use the tokenizer the model was trained with (or a model with a larger vocabulary)"
        )


def _config_token(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick(lookup, configured: str | None, known: tuple[str, ...]) -> int | None:
    for name in ((configured,) if configured else ()) + known:
        i = lookup(name)
        if i is not None:
            return i
    return None


def _load_hf(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    try:
        backend = Backend.from_file(str(path))
    except Exception as e:  # the Rust error types are not importable
        raise LmlabError(f"{path} is not a valid tokenizer.json ({e})") from None
    config_path = path.parent / "tokenizer_config.json"
    config = read_json(config_path, "") if config_path.is_file() else {}
    lookup = backend.token_to_id
    bos = _pick(lookup, _config_token(config, "bos_token"), KNOWN_BOS)
    eos = _pick(lookup, _config_token(config, "eos_token"), KNOWN_EOS)
    add_bos, add_eos = _special_rule(backend, config, bos, eos)
    return Tokenizer(backend, "hf", bos, eos, _pick(lookup, _config_token(config, "pad_token"), KNOWN_PAD),
                     add_bos=add_bos, add_eos=add_eos)


def _special_rule(backend, config: dict, bos: int | None, eos: int | None) -> tuple[bool, bool]:
    """Whether the checkpoint's tokenizer adds BOS / EOS around a text: the explicit
    `add_bos_token` / `add_eos_token` of tokenizer_config.json where given, else what its
    post-processor does (probed on one text). A tokenizer lmlab trained (no post-processor,
    our <|bos|>) adds BOS, as lmlab has always prompted its own models."""
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    added_bos = len(full) > len(plain) and bos is not None and full[0] == bos
    added_eos = len(full) > len(plain) and eos is not None and full[-1] == eos
    if backend.post_processor is None and bos is not None and backend.id_to_token(bos) == BOS:
        added_bos = True
    add_bos = config.get("add_bos_token", added_bos)
    add_eos = config.get("add_eos_token", added_eos)
    return bool(add_bos), bool(add_eos)


def _load_spm(path: Path) -> Tokenizer:
    try:
        import sentencepiece as spm
    except ImportError:
        raise LmlabError(
            "loading a sentencepiece model needs the `sentencepiece` package: pip install sentencepiece"
        ) from None
    proc = spm.SentencePieceProcessor()
    try:
        proc.LoadFromSerializedProto(path.read_bytes())
    except Exception as e:
        raise LmlabError(f"{path} is neither a tokenizer.json nor a sentencepiece model ({e})") from None

    def valid(i: int) -> int | None:
        return i if i >= 0 else None

    # A bare sentencepiece model has no such flags; Llama's convention (BOS, no EOS) is
    # what tokenizer_config.json states for the checkpoints that ship one.
    config_path = path.parent / "tokenizer_config.json"
    config = read_json(config_path, "") if config_path.is_file() else {}
    return Tokenizer(proc, "spm", valid(proc.bos_id()), valid(proc.eos_id()), valid(proc.pad_id()),
                     add_bos=bool(config.get("add_bos_token", True)),
                     add_eos=bool(config.get("add_eos_token", False)))


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE with our special tokens at ids 0..6 and all 256 bytes in the base
    alphabet, so any text round-trips exactly through encode/decode."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise LmlabError(
            f"vocab_size={vocab_size} is too small: the {len(SPECIAL_TOKENS)} special tokens and 256 "
            f"byte tokens alone need {minimum}; use at least {minimum} (a few thousand is typical)"
        )
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    seen = {"any": False}

    def counted(it):
        for t in it:
            if not isinstance(t, str):
                raise LmlabError(f"a document is {type(t).__name__}, not text; give strings (or a path)")
            seen["any"] = seen["any"] or bool(t.strip())
            yield t

    backend.train_from_iterator(counted(texts), trainer)
    if not seen["any"]:
        raise LmlabError("cannot train a tokenizer on an empty corpus (no document has any text beyond "
                         "whitespace): give at least one document")
    lookup = backend.token_to_id
    return Tokenizer(backend, "hf", lookup(BOS), lookup(EOS), lookup(PAD), add_bos=True)
