"""`build_report(run_dir)`: run_dir/report.html from the artifacts on disk alone."""
from __future__ import annotations

import time
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.io import write_text_atomic
from lmlab.report import claims, sections
from lmlab.report.artifacts import read_run
from lmlab.report.html import esc, page, section

REPORT = "report.html"
# The sections about the run and the papers' claims, in page order; then one per stage.
SECTIONS = (
    ("Configuration and timings", sections.overview),
    ("Loss curves", sections.losses),
    ("Reward models", claims.reward_models),
    ("Gold reward vs KL", claims.gold_vs_kl),
    ("PPO vs DPO", claims.policies),
    ("Proxy-tuning", claims.proxy_tuning),
    ("Sample generations", sections.samples),
    ("Experiment results", sections.experiment_results),
)
# The report stage itself has nothing to show but its own time, which the overview lists.
NOT_A_SECTION = {"report"}


def build_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report.html`: one self-contained page (inline CSS and PNG
    plots, relative links, no scripts) of everything the run directory holds. Sections whose
    artifacts are absent are left out and named in the footer."""
    root = Path(run_dir)
    if not root.is_dir():
        raise LmlabError(f"{root} is not a directory: give a run directory (e.g. runs/default) or an "
                         "experiment's output directory")
    run = read_run(root)
    built, absent = [], []
    for title, builder in SECTIONS:
        made = builder(run)
        (built if made is not None else absent).append(made or title)
    built += [sections.stage_section(run, s) for s in run.stages if s.name not in NOT_A_SECTION]
    if not built:
        raise LmlabError(f"{root} holds no run artifacts (no run.json, stage directories, metrics or results "
                         "files): give the directory `lmlab run` or an experiment wrote")
    name = (run.info or {}).get("name") or root.resolve().name
    lead = (f"Run directory <code>{esc(root.resolve().name)}</code> · built {esc(time.strftime('%Y-%m-%d %H:%M'))} "
            f"from the artifacts on disk · regenerate with <code>lmlab report {esc(str(root))}</code>")
    footer = []
    if absent:
        footer.append("<p>Left out, their artifacts are absent from this directory: "
                      f"{esc(', '.join(absent))}.</p>")
    if run.notes:
        footer.append("<p>While reading the files:</p><ul>" + "".join(f"<li>{esc(n)}</li>" for n in run.notes) + "</ul>")
    from lmlab import __version__

    footer.append(f"<p>lmlab {esc(__version__)} · a self-contained page: no scripts, no network; artifact links "
                  "are relative to the run directory.</p>")
    html = page(f"lmlab report: {name}", lead, [(s.anchor, s.title) for s in built],
                "".join(section(s.anchor, s.title, s.body) for s in built),
                "".join(footer))
    dest = root / REPORT  # beside the artifacts: its links are relative to the run directory
    write_text_atomic(dest, html)
    return dest
