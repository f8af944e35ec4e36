"""The report's plots, as PNG bytes to embed (matplotlib Agg, through lmlab.train.plot)."""
from __future__ import annotations

import io
import math
from typing import Sequence

from lmlab.train.plot import draw_losses, figure, finish, save_png

DPI = 130
WIDTH = 7.0  # inches: 910 px, about the page column's width (scaled down on a phone)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    save_png(fig, buf)
    return buf.getvalue()


def _grid(n: int, ncols: int, panel_height: float):
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = figure(nrows, ncols, size=(WIDTH, panel_height * nrows + 0.3), dpi=DPI)
    flat = [ax for row in axes for ax in row] if nrows * ncols > 1 else [axes]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def loss_panels(curves: Sequence[tuple[str, list[dict]]]) -> bytes:
    """One panel per stage: its train loss and validation points (objectives differ, so
    stages never share an axis)."""
    fig, axes = _grid(len(curves), 2, 2.9)
    for ax, (label, records) in zip(axes, curves):
        draw_losses(ax, label, records)
        ax.set_ylabel("loss")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def metric_panels(records: list[dict], keys: Sequence[str]) -> bytes:
    """Small multiples: each numeric key against the optimizer step."""
    fig, axes = _grid(len(keys), 3, 2.1)
    for ax, key in zip(axes, keys):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))
               and not isinstance(r.get(key), bool)]
        ax.plot(*zip(*pts), "-" if len(pts) > 12 else "o-", linewidth=1.1, markersize=3)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def timing_bars(rows: Sequence[tuple[str, float]]) -> bytes:
    fig, ax = figure(size=(WIDTH, 0.24 * len(rows) + 0.9), dpi=DPI)
    names = [n for n, _ in rows][::-1]
    secs = [s for _, s in rows][::-1]
    bars = ax.barh(names, secs, color="C0")
    ax.bar_label(bars, labels=[f"{s:.1f} s" for s in secs], fontsize=8, padding=2)
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max(secs) * 1.18 if max(secs) > 0 else 1)
    finish(fig, ax, "wall time per stage")
    return _png(fig)


def grouped_bars(groups: dict[str, dict[str, float]], columns: Sequence[str], title: str, ylabel: str) -> bytes:
    """One group of bars per column (e.g. an evaluation set), one bar per row name."""
    fig, ax = figure(size=(WIDTH, 3.6), dpi=DPI)
    names = list(groups)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(columns))]
        ys = [groups[name].get(c, float("nan")) for c in columns]
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylabel(ylabel)
    finish(fig, ax, title)
    ax.legend(fontsize=8, ncols=min(4, len(names)))
    return _png(fig)


def line_plot(series: Sequence[tuple[str, Sequence[float], Sequence[float], str]], xlabel: str, ylabel: str,
              title: str, hlines: Sequence[tuple[str, float, str]] = ()) -> bytes:
    """`series`: (label, xs, ys, matplotlib format); `hlines`: (label, y, format) references."""
    fig, ax = figure(size=(WIDTH, 3.8), dpi=DPI)
    for label, xs, ys, style in series:
        ax.plot(xs, ys, style, label=label, markersize=4, linewidth=1.2)
    for label, y, style in hlines:
        ax.axhline(y, linestyle=style, color="gray", linewidth=1, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    finish(fig, ax, title)
    return _png(fig)
