"""The ``adalora`` command line: ``train``, ``inspect`` and ``plot`` (more subcommands plug in the same way).

Each subcommand is a ``register_<name>(subparsers)`` function that adds its parser and sets ``func`` to the
function that runs it: adding a subcommand is one new function and one line in :data:`SUBCOMMANDS`.
Expected user errors (bad files, unknown columns, impossible schedules) print one line
``adalora: error: ...`` and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


class UsageError(ValueError):
    """A problem with the user's input that the CLI reports in one line (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adalora", description="AdaLoRA fine-tuning from the command line.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adalora`` console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, FileNotFoundError) as error:
        print(f"adalora: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
