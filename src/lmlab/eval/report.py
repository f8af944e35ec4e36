"""Evaluation results as a printed table and a JSON file."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from lmlab.io import write_json_atomic


def fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def table(rows: Sequence[Sequence], header: Sequence[str] = ("metric", "value")) -> str:
    """A plain-text table, columns padded to their widest cell."""
    cells = [list(map(str, header))] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def metric_rows(result: dict, keys: Sequence[str]) -> list[tuple]:
    """(metric, value, stderr) for the keys present in `result`."""
    return [(k, result[k], result.get(f"{k}_stderr", float("nan"))) for k in keys if k in result]


def save(result: dict, out: str | Path | None) -> None:
    if out is not None:
        write_json_atomic(out, result)
