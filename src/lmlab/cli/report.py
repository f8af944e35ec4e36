"""`lmlab report RUN_DIR`: (re)build RUN_DIR/report.html from the artifacts on disk."""
from __future__ import annotations

import argparse


def cmd_report(args: argparse.Namespace) -> None:
    from lmlab.report import build_report

    print(build_report(args.run_dir))


def add_commands(sub) -> None:
    p = sub.add_parser("report", help="a self-contained HTML report of a run or experiment directory")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `lmlab run` or an experiment")
    p.set_defaults(func=cmd_report)
