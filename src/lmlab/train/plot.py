"""Loss curves from one or more runs' metrics.jsonl, as a PNG (matplotlib, no display).

The pieces (`figure`, `draw_losses`, `finish`, `save_png`) are shared with the HTML report
(`lmlab.report`), which draws on records it has already read and embeds the PNG bytes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from lmlab.io import atomic_path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (7, 4), dpi: int = 110):
    """(fig, ax) for one panel, (fig, array of axes) for a grid; the Agg backend, no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if nrows == 1 and ncols == 1:
        return plt.subplots(figsize=size, dpi=dpi)
    return plt.subplots(nrows, ncols, figsize=size, dpi=dpi, squeeze=False)



def draw_losses(ax, label: str, records: list[dict]) -> None:
    """The train curve (`loss`) and validation points (`val_loss`) of one run's records."""
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    color = None
    if train:
        # Markers where there are few points: a single logged step is otherwise invisible.
        line, = ax.plot(*zip(*train), label=f"{label} train", linewidth=1.2,
                        marker="o" if len(train) < 12 else None, markersize=3)
        color = line.get_color()
    if val:
        ax.plot(*zip(*val), "o--", color=color, label=f"{label} val", markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")


def finish(fig, ax, title: str) -> None:
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()


def save_png(fig, out: str | Path | IO[bytes]) -> None:
    """Write the figure as PNG to a path (atomically) or a binary file object; close it."""
    import matplotlib.pyplot as plt

    try:
        if hasattr(out, "write"):
            fig.savefig(out, format="png", metadata={"Software": None})
        else:
            with atomic_path(out) as tmp:
                fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def _save(fig, ax, title: str, out: str | Path) -> Path:
    finish(fig, ax, title)
    save_png(fig, out)
    return Path(out)


def plot_losses(runs: dict[str, str | Path], out: str | Path, title: str = "loss") -> Path:
    """One train curve (and validation points, if logged) per `label: run dir or metrics file`."""
    fig, ax = figure()
    for label, run in runs.items():
        draw_losses(ax, label, read_metrics(run))
    return _save(fig, ax, title, out)


def plot_val_vs_flops(arms: dict[str, list[tuple[str | Path, float]]], out: str | Path,
                      title: str = "validation loss vs training compute") -> Path:
    """Validation loss against training FLOPs: per `label: [(run dir or metrics file, FLOPs
    per optimizer step), ...]` one colour, one line per run (seed); x is step × FLOPs/step."""
    fig, ax = figure()
    for i, (label, runs) in enumerate(arms.items()):
        for j, (run, flops_per_step) in enumerate(runs):
            val = [(r["step"] * flops_per_step, r["val_loss"]) for r in read_metrics(run) if "val_loss" in r]
            if val:
                ax.plot(*zip(*val), "o-", color=f"C{i}", label=label if j == 0 else None,
                        markersize=3, alpha=0.85)
    ax.set_xlabel("training FLOPs (6·N_active + attention, per token × tokens)")
    ax.set_ylabel("validation cross-entropy (nats/token)")
    return _save(fig, ax, title, out)
