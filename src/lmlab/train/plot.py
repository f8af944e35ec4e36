"""Loss curves from one or more runs' metrics.jsonl, as a PNG (matplotlib, no display)."""
from __future__ import annotations

import json
from pathlib import Path

from lmlab.io import atomic_path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4), dpi=110)


def _save(fig, ax, title: str, out: str | Path) -> Path:
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def plot_losses(runs: dict[str, str | Path], out: str | Path, title: str = "loss") -> Path:
    """One train curve (and validation points, if logged) per `label: run dir or metrics file`."""
    fig, ax = _figure()
    for label, run in runs.items():
        records = read_metrics(run)
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        line, = ax.plot(*zip(*train), label=f"{label} train", linewidth=1.2)
        if val:
            ax.plot(*zip(*val), "o--", color=line.get_color(), label=f"{label} val", markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    return _save(fig, ax, title, out)


def plot_val_vs_flops(arms: dict[str, list[tuple[str | Path, float]]], out: str | Path,
                      title: str = "validation loss vs training compute") -> Path:
    """Validation loss against training FLOPs: per `label: [(run dir or metrics file, FLOPs
    per optimizer step), ...]` one colour, one line per run (seed); x is step × FLOPs/step."""
    fig, ax = _figure()
    for i, (label, runs) in enumerate(arms.items()):
        for j, (run, flops_per_step) in enumerate(runs):
            val = [(r["step"] * flops_per_step, r["val_loss"]) for r in read_metrics(run) if "val_loss" in r]
            if val:
                ax.plot(*zip(*val), "o-", color=f"C{i}", label=label if j == 0 else None,
                        markersize=3, alpha=0.85)
    ax.set_xlabel("training FLOPs (6·N_active + attention, per token × tokens)")
    ax.set_ylabel("validation cross-entropy (nats/token)")
    return _save(fig, ax, title, out)
