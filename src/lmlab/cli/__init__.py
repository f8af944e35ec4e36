"""The `lmlab` command: one module per command group, each a thin wrapper that parses
arguments and calls library functions."""
from __future__ import annotations

import argparse
import sys

from lmlab.errors import LmlabError

# Command-group modules, each with `add_commands(subparsers)`.
GROUPS = ("lmlab.cli.model", "lmlab.cli.data", "lmlab.cli.train", "lmlab.cli.align", "lmlab.cli.decode",
          "lmlab.cli.serve", "lmlab.cli.rl")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="lmlab", description="A from-scratch lab for language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in GROUPS:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except LmlabError as e:
        from lmlab.train.loop import TrainingInterrupted

        print(f"lmlab: error: {e}" if not isinstance(e, TrainingInterrupted) else f"lmlab: {e}", file=sys.stderr)
        return 130 if isinstance(e, TrainingInterrupted) else 2
    except KeyboardInterrupt:
        print("lmlab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
