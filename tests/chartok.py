"""A character-level tokenizer with lmlab's special tokens, for chat tests."""
from __future__ import annotations

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "</s>"]


class CharTokenizer:
    """One id per character, special tokens recognised in text: enough of the Tokenizer
    interface for chat encoding, and transparent enough to check by eye."""

    def __init__(self) -> None:
        chars = [chr(c) for c in range(32, 127)] + ["\n"]
        self.vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
        self.inv = {i: t for t, i in self.vocab.items()}
        self.bos_id, self.eos_id, self.pad_id = 0, 1, 2
        self.vocab_size = len(self.vocab)

    def token_to_id(self, token):
        return self.vocab.get(token)

    def encode(self, text, add_bos=False, add_eos=False):
        ids, i = [], 0
        while i < len(text):
            special = next((s for s in SPECIALS if text.startswith(s, i)), None)
            ids.append(self.vocab[special or text[i]])
            i += len(special) if special else 1
        return ids

    def decode(self, ids):
        return "".join(self.inv[i] for i in ids)

    def save(self, path):
        import json
        from pathlib import Path

        Path(path).write_text(json.dumps(self.vocab))
