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
    ("Claim and verdict", claims.experiment_claim),
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


def _guarded(run, title: str, builder, *args):
    """One section; an artifact of a shape no builder expected costs that section (named in
    the footer), never the page: the report is most wanted when a run went wrong."""
    try:
        return builder(*args)
    except Exception as e:  # noqa: BLE001 - any failure of one section is reported, not raised
        run.notes.append(f"section {title!r} could not be built ({type(e).__name__}: {e}); "
                         "please report it with the file that caused it")
        return None


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
        made = _guarded(run, title, builder, run)
        (built if made is not None else absent).append(made or title)
    for stage in run.stages:
        if stage.name not in NOT_A_SECTION:
            made = _guarded(run, f"Stage: {stage.name}", sections.stage_section, run, stage)
            if made is not None:
                built.append(made)
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
