"""Parsing the command line the way the whole CLI promises: one line and exit status 2 for every mistake.

- :class:`Parser`: argparse, but an error is one line naming the option, plus where to read more
  (``see adalora train --help``), instead of the whole usage block;
- :func:`add_flags`: one flag per field of a settings dataclass, made from what the field says about itself
  (:mod:`adalora.fields`: help, range, choices), its value checked against the field's range as it is parsed;
- :func:`join_negative_numbers`: ``--lr -1e-3`` reaches the range check (argparse alone takes ``-1e-3`` for an
  option and says "expected one argument").
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NoReturn

from ..fields import About, about, base_type, choices_of, flag, hints


class UsageError(ValueError):
    """A problem with the user's input that the CLI reports in one line (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``adalora train: error: ... (see adalora train --help)``."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())  # argparse's messages may hold newlines (choices lists)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_flags(
    groups: Mapping[str, Any],
    defaults: Any,
    *,
    group: str | None = None,
    skip: Collection[str] = (),
    shown: Mapping[str, str] | None = None,
    wording: Callable[[str], str] = str,
) -> None:
    """Add a flag for every field of the dataclass instance ``defaults`` (``init_r`` -> ``--init-r``).

    Each flag's help is the field's, with its default; its value is parsed as the field's type and checked
    against the field's range or choices, so a mistake is refused naming the flag. A flag that is not typed
    leaves no attribute in the parsed namespace (``argparse.SUPPRESS``): what is there is what the user typed.

    Args:
        groups: argument groups (or the parser) by key; a field goes to ``group``, else to its ``About.group``.
        defaults: the dataclass instance whose values are the defaults shown.
        skip: fields without a flag.
        shown: words to show as the default of some fields instead of their value.
        wording: rewrites each help text (e.g. names of other fields as their flags).
    """
    types = hints(type(defaults))
    for field in dataclasses.fields(defaults):
        if field.name in skip:
            continue
        info = about(field)
        default = (shown or {}).get(field.name) or _shown(getattr(defaults, field.name), info)
        text = wording(info.help) + (f" (default: {default})" if default else "")
        options = _options(field, types[field.name], info)
        target = groups[group or info.group]
        target.add_argument(
            flag(field), dest=field.name, default=argparse.SUPPRESS, help=text.replace("%", "%%"), **options
        )


def _shown(value: Any, info: About) -> str:
    """A default as it would be typed (nothing for a flag without a value, or a None without a word)."""
    if isinstance(value, bool):
        return ""
    if value is None:
        return info.none_as or ""
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _options(field: dataclasses.Field, hint: Any, info: About) -> dict[str, Any]:
    """``add_argument``'s keywords for a field of type ``hint``: an action for bools, choices, a list, or a type."""
    kind, choices = base_type(hint), choices_of(field, hint)
    if kind is bool:
        return {"action": "store_true" if field.default is False else argparse.BooleanOptionalAction}
    if choices is not None:
        return {"choices": list(choices)}
    options: dict[str, Any] = {"metavar": info.metavar}
    if tuple in (typing.get_origin(kind), *map(typing.get_origin, typing.get_args(kind))):
        options["nargs"] = "+"  # a list of names (of ``tuple[str, ...]``, alone or in a union)
    if info.allowed is not None:
        options["type"] = _parser(info)
    elif kind in (int, float):
        options["type"] = kind  # a number without a range: parsed, the dataclass checks the rest
    return options


def _parser(info: About) -> Callable[[str], Any]:
    """An argparse ``type``: the text as a value in ``info.allowed`` (or None for ``info.none_as``)."""
    assert info.allowed is not None
    allowed, word = info.allowed, info.none_as

    def parse(text: str) -> Any:
        if word is not None and text.strip().lower() in (word, "none", "0"):
            return None
        try:
            return allowed.parse(text)
        except ValueError as error:
            alternative = f" or '{word}'" if word is not None and not _is_number(word) else ""
            raise argparse.ArgumentTypeError(f"{error}{alternative}, got '{text}'") from None

    parse.__name__ = getattr(allowed, "kind", str).__name__  # argparse names the type in some messages
    return parse


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
