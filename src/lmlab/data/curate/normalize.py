"""Pure text normalisation: Unicode form, control characters, whitespace, and the key used
to compare documents for exact duplicates."""
from __future__ import annotations

import hashlib
import re
import unicodedata

# Format characters that are invisible but break matching (zero-width space/joiners, BOM,
# soft hyphen); other Cf characters (e.g. bidi marks) are left alone.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_BLANK_RUNS = re.compile(r"\n{3,}")
_WORDS = re.compile(r"\w+")


def unicode_normalize(text: str, form: str | None) -> str:
    return unicodedata.normalize(form, text) if form else text


def strip_control(text: str) -> str:
    """Drop C0/C1 control characters (keeping tab and newline) and invisible format characters."""
    return _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n")).translate(_INVISIBLE)


def fix_whitespace(text: str) -> str:
    """One space between words, no trailing spaces, at most one blank line between paragraphs.
    Leading indentation is kept: it is syntax in code, Markdown and reStructuredText."""
    lines = []
    for line in text.split("\n"):
        body = line.lstrip(" \t")
        lines.append(line[:len(line) - len(body)] + _SPACES.sub(" ", body).rstrip() if body else "")
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip("\n").rstrip()


def words(text: str) -> list[str]:
    """Lower-cased word tokens (Unicode \\w runs), the unit of shingles and exact-dedup keys."""
    return _WORDS.findall(text.lower())


def dedup_key(text: str) -> str:
    """Text compared by exact dedup: NFKC, case-folded, punctuation and spacing ignored."""
    return " ".join(words(unicodedata.normalize("NFKC", text)))


def hash64(text: str) -> int:
    """A stable 64-bit hash (blake2b), independent of PYTHONHASHSEED."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
