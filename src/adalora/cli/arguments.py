"""Parsing the command line the way the whole CLI promises: one line and exit status 2 for every mistake.

- :class:`Parser`: argparse, but an error is one line naming the option, plus where to read more
  (``see adalora train --help``), instead of the whole usage block;
- :func:`number`: an argparse ``type`` that checks the option's range from :data:`adalora.run.settings.LIMITS`;
- :func:`join_negative_numbers`: ``--lr -1e-3`` reaches the range check (argparse alone takes ``-1e-3`` for an
  option and says "expected one argument").
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ..run.settings import LIMITS, Limit


class UsageError(ValueError):
    """A problem with the user's input that the CLI reports in one line (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``adalora train: error: ... (see adalora train --help)``."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())  # argparse's messages may hold newlines (choices lists)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one and the help text does not already explain it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def number(setting: str, *, zero_means: str | None = None) -> Callable[[str], Any]:
    """An argparse ``type`` for the numeric setting ``setting``: parses and checks its range (:data:`LIMITS`).

    Args:
        setting: a :class:`~adalora.run.settings.RunSettings` field with an entry in ``LIMITS``.
        zero_means: ``0`` is also accepted, as this word (e.g. ``"all"``), and returned as None; the word itself
            is accepted too.
    """
    limit: Limit = LIMITS[setting]

    def parse(text: str) -> Any:
        if zero_means is not None and text.strip().lower() in (zero_means, "none", "0"):
            return None
        try:
            value = limit.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(_expected(limit, zero_means, text)) from None
        if limit.problem(value) is not None:
            raise argparse.ArgumentTypeError(_expected(limit, zero_means, text))
        return value

    parse.__name__ = limit.kind.__name__  # argparse names the type in some messages
    return parse


def _expected(limit: Limit, zero_means: str | None, text: str) -> str:
    alternative = f" or '{zero_means}'" if zero_means else ""
    return f"expected {limit.describe()}{alternative}, got '{text}'"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def join_negative_numbers(argv: Sequence[str], options: set[str]) -> list[str]:
    """``[..., "--lr", "-1e-3"]`` -> ``[..., "--lr=-1e-3"]`` for the options that take one value, so that a
    negative number is read as the option's value and then refused by its range check with the flag's name."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in options and i + 1 < len(argv) and argv[i + 1].startswith("-") and _is_number(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def single_value_options(parser: argparse.ArgumentParser) -> set[str]:
    """The option strings of ``parser`` and its subcommands that take exactly one value."""
    found: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= single_value_options(sub)
        elif action.option_strings and action.nargs is None:
            found.update(action.option_strings)
    return found


def argv_or_sys(argv: Sequence[str] | None) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)
