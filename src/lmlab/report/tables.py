"""Any JSON summary as HTML tables: nested mappings flattened to dotted keys, lists of
records as their own tables, long lists summarised; bounded so a large results file
cannot make the page unreadable."""
from __future__ import annotations

from typing import Any

from lmlab.report.html import esc, fmt, note, table

MAX_ROWS = 200  # key/value rows per summary
MAX_RECORDS = 25  # rows of a list of records
MAX_COLUMNS = 14
MAX_TEXT = 400  # characters of one string cell


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _clip(v: Any) -> Any:
    if isinstance(v, str) and len(v) > MAX_TEXT:
        return v[:MAX_TEXT] + f"… ({len(v):,} characters)"
    return v


def list_text(v: list) -> str:
    if not v:
        return "[]"
    if all(is_number(x) for x in v):
        if len(v) <= 8:
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return f"{len(v)} numbers: {fmt(v[0])} … {fmt(v[-1])} (min {fmt(min(v))}, max {fmt(max(v))})"
    if all(isinstance(x, str) for x in v) and len(v) <= 8:
        return ", ".join(v)
    return f"list of {len(v)}"


def flatten(obj: Any, prefix: str = "") -> tuple[list[tuple[str, Any]], list[tuple[str, list]]]:
    """(scalar (dotted key, value) pairs, (key, list of records) tables)."""
    scalars: list[tuple[str, Any]] = []
    tables: list[tuple[str, list]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                s, t = flatten(v, key)
                scalars += s
                tables += t
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                tables.append((key, v))
            elif isinstance(v, list):
                scalars.append((key, list_text(v)))
            elif isinstance(v, dict):
                scalars.append((key, "{}"))
            else:
                scalars.append((key, _clip(v)))
    elif isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        tables.append((prefix or "rows", obj))
    elif isinstance(obj, list):
        scalars.append((prefix or "value", list_text(obj)))
    else:
        scalars.append((prefix or "value", _clip(obj)))
    return scalars, tables


def records_table(records: list[dict], caption: str | None = None) -> str:
    rows = [dict(flatten(r)[0]) for r in records[:MAX_RECORDS]]
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    # What was asked before what came back (summaries are often written with sorted keys).
    lead = [k for k in ("name", "method", "seed", "prompt") if k in columns]
    columns = lead + [k for k in columns if k not in lead]
    extra = ""
    if len(columns) > MAX_COLUMNS:
        extra = note(f"{len(columns) - MAX_COLUMNS} more column(s) not shown: "
                     + ", ".join(columns[MAX_COLUMNS:MAX_COLUMNS + 20]) + ("…" if len(columns) > MAX_COLUMNS + 20 else ""))
        columns = columns[:MAX_COLUMNS]
    more = note(f"first {MAX_RECORDS} of {len(records)} rows") if len(records) > MAX_RECORDS else ""
    return table(columns, [[r.get(c) for c in columns] for r in rows], caption) + more + extra


def json_tables(obj: Any) -> str:
    """A key/value table of the summary's scalars, then one table per list of records."""
    scalars, tables = flatten(obj)
    out = []
    if scalars:
        shown = scalars[:MAX_ROWS]
        out.append(table(("key", "value"), shown))
        if len(scalars) > MAX_ROWS:
            out.append(note(f"first {MAX_ROWS} of {len(scalars)} values"))
    for key, records in tables:
        out.append(f"<h4>{esc(key)}</h4>" + records_table(records))
    return "".join(out) or note("(empty)")
