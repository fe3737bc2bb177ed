"""The ``adalora`` command line: ``train``, ``inspect``, ``plot``, ``merge``, ``export`` and ``generate``.

One module per subcommand (``train.py``, ``inspect.py`` with ``plot``, ``convert.py`` with ``merge`` and
``export``, ``generate.py``); each has a ``register_<name>(subparsers)`` function that adds its parser and sets
``func`` to the function that runs it: adding a subcommand is one new function and one line in :data:`SUBCOMMANDS`.

Every mistake a user can make (an option out of range, bad files, unknown columns, impossible schedules, an
output directory that is not ours or cannot be written) prints one line ``adalora: error: ...`` (argparse's:
``adalora train: error: ... (see adalora train --help)``) and exits with status 2, never a traceback (set
``ADALORA_DEBUG=1`` to see one), and leaves the directories it pointed at as they were.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..files.atomic import WriteError
from .arguments import Parser, UsageError, argv_or_sys, join_negative_numbers, single_value_options
from .convert import cmd_export, cmd_merge, register_export, register_merge
from .generate import cmd_generate, register_generate
from .inspect import cmd_inspect, cmd_plot, format_rank_table, register_inspect, register_plot
from .train import cmd_train, register_train

SubParsers = Any  # argparse's private _SubParsersAction

SUBCOMMANDS: list[Callable[[SubParsers], None]] = [
    register_train,
    register_inspect,
    register_plot,
    register_merge,
    register_export,
    register_generate,
]

__all__ = [
    "SUBCOMMANDS", "UsageError", "build_parser", "cmd_export", "cmd_generate", "cmd_inspect", "cmd_merge", "cmd_plot",
    "cmd_train", "format_rank_table", "main",
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="adalora", description="AdaLoRA fine-tuning from the command line.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; an unknown option is reported by its subcommand (``see adalora train --help``)."""
    args, unknown = parser.parse_known_args(join_negative_numbers(argv, single_value_options(parser)))
    if unknown:
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subparsers.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adalora`` console script; returns the process exit status (2 for every mistake)."""
    parser = build_parser()
    try:
        args = _parse(parser, argv_or_sys(argv))
    except SystemExit as exit:  # --help (0) or a one-line argparse error (2), already printed
        return exit.code if isinstance(exit.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, FileNotFoundError) as error:
        if os.environ.get("ADALORA_DEBUG"):
            raise
        print(f"adalora: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the output was piped into a program that stopped reading (| head): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit flush stays quiet
        return 0
    except OSError as error:  # a write refused by the system after the checks (disk full, permissions changed)
        if os.environ.get("ADALORA_DEBUG"):
            raise
        where = f": {error.filename}" if error.filename else ""
        message = str(error) if isinstance(error, WriteError) else f"{error.strerror or error}{where}"
        print(f"adalora: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
