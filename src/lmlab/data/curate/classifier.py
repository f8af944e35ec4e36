"""Step 3b: a learned quality filter. Logistic regression over hashed word n-grams
(fastText-style bag of n-grams, as in GPT-3's and Phi's quality classifiers), trained on a
"good" vs "random web" split that the user provides. Saved as one safetensors file (weights +
metadata), never pickled."""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lmlab.data.curate.normalize import words
from lmlab.errors import LmlabError
from lmlab.io import atomic_path, check_output_file

FORMAT = "lmlab-quality-classifier-v1"


def features(text: str, ngrams: int, bits: int) -> list[int]:
    """Distinct hashed word 1..n-grams (buckets in [0, 2^bits)); one bucket for an empty text."""
    ws = words(text)
    mask = (1 << bits) - 1
    grams = {" ".join(ws[i:i + n]) for n in range(1, ngrams + 1) for i in range(len(ws) - n + 1)}
    return sorted({zlib.crc32(g.encode()) & mask for g in grams}) or [0]


@dataclass(frozen=True)
class TrainConfig:
    ngrams: int = 2
    bits: int = 18
    epochs: int = 10
    lr: float = 0.5
    weight_decay: float = 1e-6
    batch_size: int = 64
    seed: int = 0


class QualityClassifier:
    """P(good | text) = sigmoid(mean of the n-gram weights + bias)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, ngrams: int, bits: int):
        self.weight, self.bias, self.ngrams, self.bits = weight, bias, ngrams, bits

    def _bags(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = [features(t, self.ngrams, self.bits) for t in texts]
        offsets = torch.tensor(np.cumsum([0] + [len(f) for f in feats[:-1]]), dtype=torch.long)
        return torch.tensor([i for f in feats for i in f], dtype=torch.long), offsets

    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0)
        idx, off = self._bags(texts)
        return torch.nn.functional.embedding_bag(idx, self.weight[:, None], off, mode="mean")[:, 0] + self.bias

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        with torch.no_grad():
            return torch.sigmoid(self.logits(texts)).numpy()

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Atomic; an existing file that is not a classifier is refused unless `overwrite`."""
        from safetensors.torch import save_file

        check_output_file(path, overwrite=overwrite, is_ours=_is_classifier, what="classifier file")
        with atomic_path(path) as tmp:
            save_file({"weight": self.weight.detach().contiguous(), "bias": self.bias.detach().reshape(1)}, str(tmp),
                      metadata={"format": FORMAT, "ngrams": str(self.ngrams), "bits": str(self.bits)})

    @classmethod
    def load(cls, path: str | Path) -> "QualityClassifier":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise LmlabError(f"quality classifier not found: {path} (train one with `lmlab data filter-train`)")
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as e:  # SafetensorError, or an OSError reading it
            raise LmlabError(f"{path} is not a readable safetensors file ({e}); "
                             "train a classifier with `lmlab data filter-train`") from None
        with handle as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise LmlabError(f"{path} is not an lmlab quality classifier (format {meta.get('format')!r}); "
                                 "train one with `lmlab data filter-train`")
            return cls(f.get_tensor("weight"), f.get_tensor("bias")[0], int(meta["ngrams"]), int(meta["bits"]))


def _is_classifier(path: Path) -> bool:
    try:
        QualityClassifier.load(path)
    except LmlabError:
        return False
    return True


def train_classifier(good: Sequence[str], bad: Sequence[str], cfg: TrainConfig = TrainConfig()) -> QualityClassifier:
    """Fit by minibatch Adagrad on class-balanced logistic loss (each class weighs half)."""
    if not good or not bad:
        raise LmlabError(f"the quality classifier needs both classes: got {len(good)} good and {len(bad)} "
                         "random-web documents; provide a non-empty file for each")
    gen = torch.Generator().manual_seed(cfg.seed)
    model = QualityClassifier(torch.zeros(1 << cfg.bits, requires_grad=True), torch.zeros((), requires_grad=True),
                              cfg.ngrams, cfg.bits)
    texts = list(good) + list(bad)
    y = torch.cat([torch.ones(len(good)), torch.zeros(len(bad))])
    w = torch.cat([torch.full((len(good),), 0.5 / len(good)), torch.full((len(bad),), 0.5 / len(bad))]) * len(texts)
    opt = torch.optim.Adagrad([model.weight, model.bias], lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(cfg.epochs):
        for batch in torch.randperm(len(texts), generator=gen).split(cfg.batch_size):
            logit = model.logits([texts[i] for i in batch.tolist()])
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(logit, y[batch], reduction="none") * w[batch]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.weight.requires_grad_(False)
    model.bias.requires_grad_(False)
    return model
