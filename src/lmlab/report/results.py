"""The one form every experiment writes its results in, so each paper's claim sits beside our
figure, every seed, the same way everywhere:

    OUT/experiment.json   schema lmlab.experiment/1: the claim, the command, the machine, every
                          (arm, seed) row, the per-arm mean and standard deviation, the verdict
    OUT/results.md        the same as a page: claim, verdict, the summary and every seed

`lmlab report OUT` shows them as the report's "Claim and verdict" section; docs/experiments.md
links each claim to its experiment.
"""
from __future__ import annotations

import math
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from lmlab.errors import LmlabError

SCHEMA = "lmlab.experiment/1"
RESULTS_JSON = "experiment.json"
RESULTS_MD = "results.md"


@dataclass(frozen=True)
class Claim:
    source: str  # the paper, e.g. "Ramé et al. 2024 (WARM)"
    statement: str  # what it claims, in one sentence
    paper_figure: str = ""  # its number, as the paper gives it


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and math.isfinite(float(value)):
        return float(value)
    return None


def summarise(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> list[dict]:
    """Per arm, in the order arms first appear: n seeds, and each metric's mean and sample
    standard deviation over the seeds that have it (std 0 for one seed, None for none)."""
    arms: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        arms.setdefault(str(row["arm"]), []).append(row)
    out = []
    for arm, group in arms.items():
        entry: dict[str, Any] = {"arm": arm, "n": len(group)}
        for m in metrics:
            xs = [x for x in (_number(r.get(m)) for r in group) if x is not None]
            entry[m] = {"mean": statistics.fmean(xs) if xs else None,
                        "std": (statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else None}
        out.append(entry)
    return out


def _check(name: str, metrics: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    if not name or not metrics:
        raise LmlabError("an experiment's results need a name and at least one metric")
    if not rows:
        raise LmlabError(f"experiment {name!r} has no result rows: it ran no arm; nothing is written")
    for i, row in enumerate(rows):
        missing = [k for k in ("arm", "seed") if k not in row]
        if missing:
            raise LmlabError(f"experiment {name!r}: row {i} lacks {', '.join(missing)}; every row is one "
                             "(arm, seed) with its metrics")
        bad = [m for m in metrics if m in row and row[m] is not None and _number(row[m]) is None]
        if bad:
            raise LmlabError(f"experiment {name!r}: row {i} ({row['arm']}, seed {row['seed']}) has "
                             f"non-numeric or non-finite {', '.join(bad)}: {[row[m] for m in bad]}")


def _cell(value: Any, digits: int = 4) -> str:
    x = _number(value)
    if x is None:
        return "–" if value is None else str(value)
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def render_markdown(result: Mapping[str, Any]) -> str:
    """results.md: the claim, the verdict, mean ± std per arm, then every seed."""
    metrics = result["metrics"]
    claim = result["claim"]
    lines = [f"# {result['title']}", "",
             f"**Claim** ({claim['source']}): {claim['statement']}"
             + (f" Paper: {claim['paper_figure']}." if claim.get("paper_figure") else ""), "",
             f"**Ours**: {result['verdict']}", "",
             f"Command: `{result['command']}`  ", f"Machine: {_machine_line(result.get('machine') or {})}  ",
             f"Written {result['written']}", "", "## Mean ± std over seeds", "",
             "| arm | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for s in result["summary"]:
        cells = []
        for m in metrics:
            v = s[m]
            cells.append("–" if v["mean"] is None else f"{_cell(v['mean'])} ± {_cell(v['std'], 2)}")
        lines.append(f"| {s['arm']} | {s['n']} | " + " | ".join(cells) + " |")
    lines += ["", "## Every seed", "", "| arm | seed | " + " | ".join(metrics) + " |",
              "|---|---|" + "---|" * len(metrics)]
    for r in result["rows"]:
        lines.append(f"| {r['arm']} | {r['seed']} | " + " | ".join(_cell(r.get(m)) for m in metrics) + " |")
    if result.get("notes"):
        lines += ["", "## Notes", "", result["notes"].strip()]
    if result.get("figures"):
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in result["figures"]]
    return "\n".join(lines) + "\n"


def _machine_line(machine: Mapping[str, Any]) -> str:
    parts = [str(machine.get("cpu", "unknown CPU"))]
    if machine.get("cores"):
        parts.append(f"{machine['cores']} cores")
    if machine.get("torch_threads"):
        parts.append(f"{machine['torch_threads']} torch threads")
    if machine.get("cuda"):
        parts.append(f"GPU {machine['cuda']}")
    if machine.get("torch"):
        parts.append(f"torch {machine['torch']}")
    return ", ".join(parts)


def write_results(out: str | Path, *, name: str, title: str, claim: Claim, command: str,
                  metrics: Sequence[str], rows: Iterable[Mapping[str, Any]], verdict: str, notes: str = "",
                  figures: Sequence[str] = (), extra: Mapping[str, Any] | None = None) -> dict:
    """Write OUT/experiment.json and OUT/results.md (atomically) and return the JSON object.
    `rows` are one dict per (arm, seed) holding the `metrics` (a metric may be absent or None
    for an arm it does not apply to); `figures` are file names inside OUT; `extra` is kept
    verbatim under "extra" (an experiment's own detail, e.g. curves)."""
    from lmlab.io import write_json_atomic, write_text_atomic
    from lmlab.precision import machine_description

    rows = [dict(r) for r in rows]
    metrics = list(metrics)
    _check(name, metrics, rows)
    out = Path(out)
    missing = [f for f in figures if not (out / f).is_file()]
    if missing:
        raise LmlabError(f"experiment {name!r}: figures {missing} are not files in {out}; write them first")
    result = {"schema": SCHEMA, "name": name, "title": title, "claim": asdict(claim), "command": command,
              "machine": machine_description(), "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "metrics": metrics, "verdict": verdict, "notes": notes, "figures": list(figures),
              "summary": summarise(rows, metrics), "rows": rows, "extra": dict(extra or {})}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RESULTS_JSON, result)
    write_text_atomic(out / RESULTS_MD, render_markdown(result))
    return result


def command_line(script: str | Path, argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run, rebuilt from its arguments (sys.argv[1:] by
    default), with the script's path relative to the working directory when it lies below it."""
    path = Path(script).resolve()
    try:
        shown = str(path.relative_to(Path.cwd()))
    except ValueError:
        shown = str(path)
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", shlex.quote(shown), *(shlex.quote(str(a)) for a in args)])


def paired(rows: Sequence[Mapping[str, Any]], metric: str, a: str, b: str) -> dict:
    """Arms `a` and `b` compared seed by seed on `metric`, over the seeds where both have it:
    each arm's mean, the per-seed differences b - a, their mean and standard error (None for
    fewer than two seeds), and on how many seeds b is above a, below it, or level."""
    by = {(str(r["arm"]), r["seed"]): _number(r.get(metric)) for r in rows}
    seeds = [s for (arm, s), v in by.items() if arm == a and v is not None and by.get((b, s)) is not None]
    xa = [by[(a, s)] for s in seeds]
    xb = [by[(b, s)] for s in seeds]
    diffs = [y - x for x, y in zip(xa, xb)]
    n = len(diffs)
    return {"metric": metric, "a": a, "b": b, "seeds": seeds, "n": n,
            "mean_a": statistics.fmean(xa) if n else None, "mean_b": statistics.fmean(xb) if n else None,
            "diffs": diffs, "mean_diff": statistics.fmean(diffs) if n else None,
            "stderr": statistics.stdev(diffs) / math.sqrt(n) if n > 1 else None,
            "b_above": sum(d > 0 for d in diffs), "b_below": sum(d < 0 for d in diffs),
            "level": sum(d == 0 for d in diffs)}


def is_results(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("schema") == SCHEMA and isinstance(obj.get("summary"), list)


__all__ = ["Claim", "RESULTS_JSON", "RESULTS_MD", "SCHEMA", "command_line", "is_results", "paired",
           "render_markdown", "summarise", "write_results"]
