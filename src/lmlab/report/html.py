"""HTML building blocks for a self-contained page: every piece of text taken from a file
goes through `esc` (generated samples are untrusted), images are inline PNG data, links
are relative, and the one stylesheet is inline. No scripts."""
from __future__ import annotations

import base64
import html
import math
import re
from typing import Any, Iterable, Sequence
from urllib.parse import quote


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell's text (unescaped): numbers to `digits` significant figures."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"
    if isinstance(value, str) and not value.strip():
        # A generated answer of nothing but spaces must not look like a missing cell.
        return "(empty)" if not value else f"({len(value)} whitespace characters)"
    return str(value)


def href(rel_path: str) -> str:
    """A relative link to an artifact, quoted for a URL and escaped for an attribute."""
    return esc(quote(rel_path))


def link(rel_path: str, text: str | None = None) -> str:
    return f'<a href="{href(rel_path)}">{esc(text if text is not None else rel_path)}</a>'


def table(headers: Sequence[Any], rows: Iterable[Sequence[Any]], caption: str | None = None,
          raw: bool = False) -> str:
    """A table that scrolls sideways on a narrow screen. Cells are formatted and escaped
    (`raw=True`: cells are HTML already built from escaped parts)."""
    def cell(v: Any) -> str:
        if raw:
            return f"<td>{v}</td>"
        # Long text (a prompt, a generated answer) wraps; numbers and short labels do not.
        cls = ' class="text"' if isinstance(v, str) and len(v) > 40 else ""
        return f"<td{cls}>{esc(fmt(v))}</td>"

    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    # The caption sits above the table, not inside it: a caption is only as wide as its table.
    cap = f'<p class="caption">{esc(caption)}</p>' if caption else ""
    return f'{cap}<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}"></figure>'


def pre(text: str, cls: str = "") -> str:
    attr = f' class="{esc(cls)}"' if cls else ""
    return f"<pre{attr}>{esc(text)}</pre>"


def para(text: str) -> str:
    return f"<p>{esc(text)}</p>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def details(summary: str, body: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


_INLINE = [(re.compile(r"\*\*(.+?)\*\*"), r"<strong>\1</strong>"), (re.compile(r"`([^`]+)`"), r"<code>\1</code>")]


def _inline(text: str) -> str:
    out = esc(text)  # escaped first: the patterns below can only wrap escaped text in tags
    for pattern, repl in _INLINE:
        out = pattern.sub(repl, out)
    return out


def markdown(text: str) -> str:
    """The subset of Markdown experiments write in results.md: headings, pipe tables, lists,
    paragraphs, **bold** and `code`. Everything else shows as text."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line.strip():
            i += 1
            continue
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m:
            level = min(len(m.group(1)) + 2, 6)  # under the report's own h1/h2
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
            continue
        if line.lstrip().startswith("|"):
            block = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            rows = [r for r in block if not all(re.fullmatch(r":?-{2,}:?", c) for c in r if c)]
            head, body = rows[0], rows[1:]
            out.append('<div class="scroll"><table><thead><tr>' + "".join(f"<th>{_inline(c)}</th>" for c in head)
                       + "</tr></thead><tbody>" + "".join(
                           "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</tbody></table></div>")
            continue
        if re.match(r"^\s*[-*]\s+", line):
            items = []
            while i < len(lines) and re.match(r"^\s*[-*]\s+", lines[i]):
                items.append(re.sub(r"^\s*[-*]\s+", "", lines[i]))
                i += 1
            out.append("<ul>" + "".join(f"<li>{_inline(t)}</li>" for t in items) + "</ul>")
            continue
        block = []
        while i < len(lines) and lines[i].strip() and not re.match(r"^(#{1,6}\s|\s*\||\s*[-*]\s)", lines[i]):
            block.append(lines[i].strip())
            i += 1
        out.append(f"<p>{_inline(' '.join(block))}</p>")
    return "".join(out)


CSS = """
:root { color-scheme: light; --fg: #1d2330; --muted: #5b6475; --line: #d9dde5; --bg: #ffffff;
        --soft: #f4f6f9; --accent: #2456a6; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
       font: 16px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 58rem; margin: 0 auto; padding: 1rem; }
h1 { font-size: 1.6rem; margin: 0.5rem 0 0.25rem; overflow-wrap: anywhere; }
h2 { font-size: 1.3rem; margin: 2rem 0 0.5rem; padding-bottom: 0.2rem; border-bottom: 2px solid var(--line); }
h3 { font-size: 1.1rem; margin: 1.2rem 0 0.4rem; }
h4, h5, h6 { font-size: 1rem; margin: 1rem 0 0.3rem; }
a { color: var(--accent); overflow-wrap: anywhere; }
p.lead, p.note, footer { color: var(--muted); }
p.note { font-size: 0.9rem; }
nav ol { columns: 14rem; padding-left: 1.4rem; margin: 0.5rem 0; }
figure { margin: 0.8rem 0; }
img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
.scroll { overflow-x: auto; -webkit-overflow-scrolling: touch; margin: 0.6rem 0; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.9rem; font-variant-numeric: tabular-nums; }
p.caption { color: var(--muted); font-size: 0.9rem; margin: 0.8rem 0 -0.3rem; }
th, td { border: 1px solid var(--line); padding: 0.3rem 0.55rem; text-align: left; vertical-align: top;
         white-space: nowrap; }
td.text { white-space: pre-wrap; min-width: 14rem; max-width: 32rem; overflow-wrap: anywhere; }
th { background: var(--soft); }
pre { background: var(--soft); padding: 0.6rem; border-radius: 4px; overflow-x: auto; font-size: 0.85rem;
      white-space: pre-wrap; overflow-wrap: anywhere; }
pre.sample { border-left: 3px solid var(--accent); }
code { font-size: 0.9em; }
details { margin: 0.5rem 0; }
summary { cursor: pointer; color: var(--accent); }
ul.files { padding-left: 1.2rem; columns: 16rem; }
.badge { display: inline-block; font-size: 0.8rem; padding: 0 0.4rem; border-radius: 3px; background: var(--soft);
         border: 1px solid var(--line); }
.badge.bad { background: #fbeaea; border-color: #e3b4b4; }
footer { border-top: 1px solid var(--line); margin-top: 2.5rem; padding-top: 0.6rem; font-size: 0.85rem; }
@media (max-width: 600px) { main { padding: 0.6rem; } body { font-size: 15px; } th, td { padding: 0.25rem 0.4rem; } }
"""


def page(title: str, lead: str, toc: list[tuple[str, str]], body: str, footer: str) -> str:
    nav = ('<nav><ol>' + "".join(f'<li><a href="#{esc(a)}">{esc(t)}</a></li>' for a, t in toc) + "</ol></nav>"
           if toc else "")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{esc(title)}</h1><p class=\"lead\">{lead}</p>{nav}{body}"
            f"<footer>{footer}</footer></main></body></html>\n")
