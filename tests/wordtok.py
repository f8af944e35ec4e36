"""A word-level tokenizer with lmlab's special tokens and a handful of symbols: small enough
that a randomly initialised policy samples every answer, so RL tests solve tasks in seconds."""
from __future__ import annotations

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


class WordTokenizer:
    def __init__(self, words=("a", "b", "c", "d")) -> None:
        self.vocab = {t: i for i, t in enumerate(SPECIALS + list(words))}
        self.inv = {i: t for t, i in self.vocab.items()}
        self.bos_id, self.eos_id, self.pad_id = 0, 1, 2
        self.vocab_size = len(self.vocab)

    def token_to_id(self, token):
        return self.vocab.get(token)

    def encode(self, text, add_bos=False, add_eos=False):
        return [self.vocab[w] for w in text.replace("<|end|>", " <|end|> ").split()]

    def decode(self, ids):
        return " ".join(self.inv[i] for i in ids)

    def save(self, path):
        import json
        from pathlib import Path

        Path(path).write_text(json.dumps(self.vocab))
