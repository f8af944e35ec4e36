"""The run report: `build_report(run_dir)` writes run_dir/report.html, one self-contained
page (plots inline, no network, readable on a phone) built from the artifacts on disk alone,
for a pipeline run and an experiment's output directory alike.

    artifacts.py  what a run directory holds, read tolerantly
    html.py       escaping, tables, inline images, the page and its stylesheet
    tables.py     any JSON summary as tables
    figures.py    the plots, as PNG bytes (through lmlab.train.plot)
    sections.py   configuration and timings, losses, samples, one section per stage, experiment results
    claims.py     an experiment's claim and verdict, reward-model accuracy, gold reward vs KL, PPO vs DPO,
                  proxy-tuning's gap closed
    results.py    write_results: the one form experiments write (experiment.json, results.md)
    build.py      build_report
"""
from lmlab.report.build import REPORT, build_report

__all__ = ["REPORT", "build_report"]
