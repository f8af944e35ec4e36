"""Incremental detokenisation for streaming: turn one token at a time into text deltas that
never have to be taken back (no half UTF-8 characters, nothing that may become a stop
string), and find stop strings as soon as they appear."""
from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a byte-level decoder shows for an incomplete UTF-8 sequence


def stop_prefix_overlap(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string:
    those characters may still turn into a stop string, so they are held back."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def first_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


class TextStream:
    """Feed generated tokens with `push`; each call returns (new text, stopped)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out
        self.text = ""

    def push(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        text = self.text = self.decode(self.ids)
        if self.stops:
            # A stop string can only start in text not yet handed out (or just before it).
            cut = first_stop(text, self.stops, max(0, self.sent - self.longest))
            if cut is not None:
                delta = text[self.sent:cut] if cut > self.sent else ""
                self.sent = max(self.sent, cut)
                self.text = text[:cut]
                return delta, True
        safe = len(text)
        while safe > self.sent and text[safe - 1] == REPLACEMENT:
            safe -= 1
        safe -= stop_prefix_overlap(text[:safe], self.stops)
        if safe <= self.sent:
            return "", False
        delta, self.sent = text[self.sent:safe], safe
        return delta, False

    def flush(self) -> str:
        """Everything held back, once generation has ended without a stop string."""
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta
