"""Step 3a: heuristic quality rules in the style of Gopher (Rae et al. 2021, appendix A) and
C4 (Raffel et al. 2020). Every rule is a pure function of the text with its own threshold;
set a threshold to null to switch the rule off. Defaults are Gopher's except `min_words`
(Gopher: 50), lowered because our corpora hold short documents."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from lmlab.data.curate.documents import Document
from lmlab.data.curate.report import StepReport

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_BULLETS = ("•", "-", "*", "·", "‣", "◦")
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class QualityConfig:
    min_words: int | None = 20
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_to_word_ratio: float | None = 0.1       # "#" and "..."/"…" per word
    max_bullet_line_fraction: float | None = 0.9
    max_ellipsis_line_fraction: float | None = 0.3
    min_alpha_word_fraction: float | None = 0.8        # words with at least one letter
    min_stop_words: int | None = 2                     # distinct English stop words present
    max_duplicate_line_fraction: float | None = 0.3
    max_duplicate_line_char_fraction: float | None = 0.2
    # Most frequent n-gram's share of all word characters, for n = 2, 3, 4.
    max_top_ngram_char_fraction: tuple[float, ...] | None = (0.20, 0.18, 0.16)
    # Share of word characters inside n-grams that occur more than once, for n = 5..10.
    max_duplicate_ngram_char_fraction: tuple[float, ...] | None = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)
    blocklist: tuple[str, ...] | None = ("lorem ipsum",)   # C4: case-insensitive phrases
    reject_curly_brace: bool = False                       # C4 drops "{" (code); off for mixed corpora


def top_ngram_char_fraction(ws: list[str], n: int) -> float:
    total = sum(map(len, ws))
    grams = Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))
    if not grams or not total:
        return 0.0
    gram, count = grams.most_common(1)[0]
    return count * sum(map(len, gram)) / total


def duplicate_ngram_char_fraction(ws: list[str], n: int) -> float:
    """Characters of words covered by any n-gram occurring more than once, over all word
    characters (each word counted once even if covered by several repeats)."""
    total = sum(map(len, ws))
    starts = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
    if not starts or not total:
        return 0.0
    counts = Counter(starts)
    covered = [False] * len(ws)
    for i, g in enumerate(starts):
        if counts[g] > 1:
            covered[i:i + n] = [True] * n
    return sum(len(w) for w, c in zip(ws, covered) if c) / total


def quality_rule(text: str, cfg: QualityConfig) -> str | None:
    """The first rule `text` fails (its name, used in the report), or None if it passes all."""
    ws = _WORD.findall(text)
    lw = [w.lower().strip(".,;:!?\"'()[]") for w in ws]
    n = len(ws)
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if cfg.min_words is not None and n < cfg.min_words:
        return "too_few_words"
    if cfg.max_words is not None and n > cfg.max_words:
        return "too_many_words"
    mean_len = sum(map(len, ws)) / max(n, 1)
    if cfg.min_mean_word_length is not None and mean_len < cfg.min_mean_word_length:
        return "mean_word_length_low"
    if cfg.max_mean_word_length is not None and mean_len > cfg.max_mean_word_length:
        return "mean_word_length_high"
    if cfg.max_symbol_to_word_ratio is not None:
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / max(n, 1) > cfg.max_symbol_to_word_ratio:
            return "symbol_to_word_ratio"
    if lines and cfg.max_bullet_line_fraction is not None:
        if sum(ln.startswith(_BULLETS) for ln in lines) / len(lines) > cfg.max_bullet_line_fraction:
            return "bullet_lines"
    if lines and cfg.max_ellipsis_line_fraction is not None:
        if sum(ln.endswith(("...", "…")) for ln in lines) / len(lines) > cfg.max_ellipsis_line_fraction:
            return "ellipsis_lines"
    if cfg.min_alpha_word_fraction is not None:
        if sum(any(c.isalpha() for c in w) for w in ws) / max(n, 1) < cfg.min_alpha_word_fraction:
            return "alpha_words"
    if cfg.min_stop_words is not None and len(STOP_WORDS.intersection(lw)) < cfg.min_stop_words:
        return "stop_words"
    if lines and (cfg.max_duplicate_line_fraction is not None or cfg.max_duplicate_line_char_fraction is not None):
        counts = Counter(lines)
        dup = [ln for ln in lines if counts[ln] > 1]
        if cfg.max_duplicate_line_fraction is not None and len(dup) / len(lines) > cfg.max_duplicate_line_fraction:
            return "duplicate_lines"
        if cfg.max_duplicate_line_char_fraction is not None and \
                sum(map(len, dup)) / max(sum(map(len, lines)), 1) > cfg.max_duplicate_line_char_fraction:
            return "duplicate_line_chars"
    if cfg.max_top_ngram_char_fraction is not None:
        for n_, limit in zip((2, 3, 4), cfg.max_top_ngram_char_fraction):
            if top_ngram_char_fraction(lw, n_) > limit:
                return f"top_{n_}gram"
    if cfg.max_duplicate_ngram_char_fraction is not None:
        for n_, limit in zip(range(5, 11), cfg.max_duplicate_ngram_char_fraction):
            if duplicate_ngram_char_fraction(lw, n_) > limit:
                return f"duplicate_{n_}grams"
    lower = text.lower()
    if cfg.blocklist and any(p in lower for p in cfg.blocklist):
        return "blocklist"
    if cfg.reject_curly_brace and "{" in text:
        return "curly_brace"
    return None


def filter_quality(docs, cfg: QualityConfig, step: StepReport) -> Iterator[Document]:
    for doc in docs:
        rule = quality_rule(doc["text"], cfg)
        if rule:
            step.remove(rule)
        else:
            step.keep()
            yield doc
