"""Step 1: normalise and clean. Edits (Unicode form, control characters, whitespace,
boilerplate lines) change text in place and are counted; document rules (charset, language,
length) remove whole documents, each removal attributed to the first rule that fired."""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from lmlab.data.curate.documents import Document, Source, iterate
from lmlab.data.curate.normalize import fix_whitespace, hash64, strip_control, unicode_normalize
from lmlab.data.curate.report import StepReport
from lmlab.errors import LmlabError


@dataclass(frozen=True)
class CleanConfig:
    unicode_form: str | None = "NFC"        # "NFC", "NFKC" (also folds compatibility forms) or null
    strip_control: bool = True
    fix_whitespace: bool = True
    # A line (of at least `boilerplate_min_chars`) found in at least `boilerplate_min_docs`
    # documents AND at least `boilerplate_min_fraction` of all documents is boilerplate
    # (cookie banners, navigation, "All rights reserved"). null disables the extra pass.
    boilerplate_min_docs: int | None = 5
    boilerplate_min_fraction: float = 0.001
    boilerplate_min_chars: int = 10
    # Charset: U+FFFD replacement characters and UTF-8-read-as-Latin-1 mojibake ("Ã©", "â€").
    max_bad_char_fraction: float | None = 0.01
    # Language heuristic: share of letters in the Latin script.
    min_latin_letter_fraction: float | None = 0.9
    min_chars: int | None = 20
    max_chars: int | None = 100_000

    def __post_init__(self) -> None:
        if self.unicode_form not in (None, "NFC", "NFKC", "NFD", "NFKD"):
            raise LmlabError(f"clean.unicode_form must be NFC, NFKC, NFD, NFKD or null, got {self.unicode_form!r}")


_MOJIBAKE = ("Ã©", "Ã¨", "Ã¤", "Ã¶", "Ã¼", "â€", "Â ")


def bad_char_fraction(text: str) -> float:
    bad = text.count("\ufffd") + 2 * sum(text.count(m) for m in _MOJIBAKE)
    return bad / max(len(text), 1)


def latin_letter_fraction(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    # Below U+0250 everything alphabetic is Latin; above, ask the name (fullwidth, ligatures).
    return sum(1 for c in letters if ord(c) < 0x250 or "LATIN" in unicodedata.name(c, "")) / len(letters)


def _lines_for_boilerplate(text: str, cfg: CleanConfig) -> set[str]:
    return {line.strip() for line in text.split("\n") if len(line.strip()) >= cfg.boilerplate_min_chars}


def _edit(text: str, cfg: CleanConfig, step: StepReport) -> str:
    for name, enabled, fn in (("unicode_normalized", cfg.unicode_form, lambda t: unicode_normalize(t, cfg.unicode_form)),
                              ("control_chars_stripped", cfg.strip_control, strip_control),
                              ("whitespace_fixed", cfg.fix_whitespace, fix_whitespace)):
        if enabled:
            new = fn(text)
            if new != text:
                step.edits[name] += 1
                text = new
    return text


def find_boilerplate(source: Source, cfg: CleanConfig) -> set[int]:
    """First pass: 64-bit hashes of lines repeated across many documents. Memory is 8 bytes
    per distinct (document, line) pair, counted once with numpy."""
    chunks, buf, n_docs = [], [], 0
    for doc in iterate(source):
        n_docs += 1
        text = _edit(doc["text"], cfg, StepReport("scratch"))
        buf.extend(hash64(line) for line in _lines_for_boilerplate(text, cfg))
        if len(buf) >= 1 << 20:
            chunks.append(np.array(buf, dtype=np.uint64))
            buf = []
    chunks.append(np.array(buf, dtype=np.uint64))
    hashes, counts = np.unique(np.concatenate(chunks), return_counts=True)
    need = max(cfg.boilerplate_min_docs, int(np.ceil(cfg.boilerplate_min_fraction * n_docs)))
    return set(hashes[counts >= need].tolist())


def clean_documents(source: Source, cfg: CleanConfig, step: StepReport) -> Iterator[Document]:
    """Yield cleaned documents. With boilerplate removal on, `source` is read twice."""
    boiler = find_boilerplate(source, cfg) if cfg.boilerplate_min_docs is not None else set()
    for doc in iterate(source):
        text = _edit(doc["text"], cfg, step)
        if boiler:
            lines = text.split("\n")
            kept = [ln for ln in lines if len(ln.strip()) < cfg.boilerplate_min_chars
                    or hash64(ln.strip()) not in boiler]
            if len(kept) != len(lines):
                step.edits["boilerplate_docs"] += 1
                step.edits["boilerplate_lines"] += len(lines) - len(kept)
                text = fix_whitespace("\n".join(kept)) if cfg.fix_whitespace else "\n".join(kept).strip()
        rule = document_rule(text, cfg)
        if rule:
            step.remove(rule)
            continue
        step.keep()
        yield {**doc, "text": text}


def document_rule(text: str, cfg: CleanConfig) -> str | None:
    """The first document-level rule `text` fails, or None."""
    if not text:
        return "empty"
    if cfg.min_chars is not None and len(text) < cfg.min_chars:
        return "too_short"
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        return "too_long"
    if cfg.max_bad_char_fraction is not None and bad_char_fraction(text) > cfg.max_bad_char_fraction:
        return "bad_charset"
    if cfg.min_latin_letter_fraction is not None and latin_letter_fraction(text) < cfg.min_latin_letter_fraction:
        return "non_latin_script"
    return None
