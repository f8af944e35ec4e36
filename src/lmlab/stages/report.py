"""Stage `report`: run_dir/report.html from whatever the run directory holds (lmlab.report);
it needs no other stage, so it can run last, alone (`--only report`) or on a half-done run.
`lmlab report RUN_DIR` builds the same page outside a run."""
from __future__ import annotations

NEEDS: tuple[str, ...] = ()
SECTIONS: tuple[str, ...] = ()
ALWAYS_RUN = True  # it reads every stage's outputs: rebuilt on every run, --resume included


def run(ctx) -> None:
    from lmlab.report import build_report

    ctx.out.mkdir(parents=True, exist_ok=True)
    path = build_report(ctx.run_dir)
    ctx.echo(f"report -> {path}")
