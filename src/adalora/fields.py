"""Dataclass fields that carry their own help and allowed values, and the one validator that reads them.

A setting is declared once, with :func:`setting`: its default, what it means, and which values it takes (a
:class:`Range` of numbers, a :class:`Pattern`, or choices). Two readers use that one declaration: the dataclass's
validator (:func:`check_fields`, called on construction) and the command line, which turns every field into a flag
with that help and checks the flag's value against the same range (``adalora.cli.arguments``). So a new field of
:class:`~adalora.AdaLoRAConfig` is a new ``adalora train`` flag without a line of CLI code.

Help lives in field metadata rather than in the trailing comments of the class: metadata is there at run time
whatever the installation (no source file needed, unlike ``inspect.getsource``), and it can carry the range and
choices that a comment could only describe in words.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A field of a settings dataclass with a value it does not take: ``<Owner>.<field>: <problem>. <Fix>.``

    Attributes:
        owner: the dataclass's name (``AdaLoRAConfig``).
        field: the field's name.
        problem: what is wrong, without the field's name (``must be an integer >= 1, got 0``).
        fix: what to do, as a sentence.
    """

    def __init__(self, owner: str, field: str, problem: str, fix: str) -> None:
        super().__init__(f"{owner}.{field}: {problem}. {fix}")
        self.owner, self.field, self.problem, self.fix = owner, field, problem, fix


@dataclass(frozen=True)
class Range:
    """The numbers a field takes: an int or a float in [low, high] (either end open where said); never NaN/inf."""

    kind: type  # int or float
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False  # high itself is not allowed

    def describe(self) -> str:
        """The range in words: ``an integer >= 1``, ``a number > 0``, ``a number in [0, 1)``."""
        what = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            if self.low_open and self.high_open:
                return f"{what} strictly between {self.low:g} and {self.high:g}"
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{what} in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {self.low:g}"
        return what

    def problem(self, value: Any) -> str | None:
        """None if ``value`` is in the range, else ``must be <range>, got <value>``."""
        wrong = f"must be {self.describe()}, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return wrong
        if self.kind is int and not isinstance(value, int):
            return wrong
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return wrong
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return wrong
        return None

    def parse(self, text: str) -> Any:
        """``text`` as a number in the range; ValueError(``expected <range>``) otherwise."""
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        if value is None or self.problem(value) is not None:
            raise ValueError(f"expected {self.describe()}")
        return value


@dataclass(frozen=True)
class Pattern:
    """The strings a field takes: those matching ``regex`` in full, described by ``words``."""

    regex: str
    words: str  # e.g. "auto, cpu, cuda, cuda:N or mps"

    def describe(self) -> str:
        return self.words

    def problem(self, value: Any) -> str | None:
        if isinstance(value, str) and re.fullmatch(self.regex, value):
            return None
        return f"must be {self.words}, got {value!r}"

    def parse(self, text: str) -> str:
        if self.problem(text) is not None:
            raise ValueError(f"expected {self.words}")
        return text


@dataclass(frozen=True)
class Names:
    """A list of names (a ``tuple[str, ...]`` field), none of them empty: of modules, of parameters."""

    what: str  # e.g. "module names"
    example: str  # e.g. '["classifier"]'

    def describe(self) -> str:
        return f"a list of {self.what}"

    def problem(self, value: Any) -> str | None:
        if isinstance(value, tuple) and all(isinstance(v, str) and v for v in value):
            return None
        return f"must be {self.describe()}, got {value!r}"

    def parse(self, text: str) -> str:
        """One name of the list (the command line gives them one by one)."""
        if not text:
            raise ValueError(f"expected {self.what}")
        return text


# The ranges most settings share.
COUNT = Range(int, 1)  # ranks, epochs, sizes: whole numbers from 1
STEPS = Range(int, 0)  # step counts and seeds: whole numbers from 0
POSITIVE = Range(float, 0, low_open=True)  # learning rate, alpha, init std
NON_NEGATIVE = Range(float, 0)  # weights of penalties, decay, clipping norms
FRACTION = Range(float, 0, 1, high_open=True)  # [0, 1): dropout, shares of training
OPEN_UNIT = Range(float, 0, 1, low_open=True, high_open=True)  # (0, 1): EMA factors


@dataclass(frozen=True)
class About:
    """What a field says about itself (``field.metadata["about"]``); read by :func:`check_fields` and the CLI.

    Attributes:
        help: what the setting does, in a phrase (the flag's help).
        allowed: the values it takes, when a range, a pattern or a list of names says it; None for free text.
        choices: the values it takes, when it is one of a few names (a ``Literal`` type says it by itself).
        metavar: the flag's placeholder (``R``, ``STEPS``).
        group: which part of ``adalora train --help`` lists it (a key of the CLI's groups).
        none_as: the word that means None on the command line (``all`` for no limit), besides ``none`` and ``0``.
        flag: the flag, when it is not ``--field-name``.
        instead_of: another field this one replaces when given (two ways to say one thing).
    """

    help: str
    allowed: Range | Pattern | Names | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    group: str | None = None
    none_as: str | None = None
    flag: str | None = None
    instead_of: str | None = None


def setting(default: Any, help: str, allowed: Range | Pattern | Names | None = None, **about: Any) -> Any:
    """A dataclass field with ``default`` that describes itself (see :class:`About`)."""
    return dataclasses.field(default=default, metadata={"about": About(help, allowed, **about)})


def about(field: dataclasses.Field) -> About:
    """The :class:`About` of a field (an empty one for a field declared without :func:`setting`)."""
    return field.metadata.get("about") or About("")


def flag(field: dataclasses.Field) -> str:
    """The command-line flag of a field: ``--field-name``, unless its :class:`About` names another."""
    return about(field).flag or "--" + field.name.replace("_", "-")


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """The resolved type of every field of the dataclass ``cls`` (annotations may be strings); looked up once per
    class, as every construction of a settings dataclass checks its fields."""
    return typing.get_type_hints(cls)


def optional(hint: Any) -> bool:
    """Whether ``None`` is a value of the type ``hint`` (``int | None``)."""
    return type(None) in typing.get_args(hint) and typing.get_origin(hint) in (Union, types.UnionType)


def base_type(hint: Any) -> Any:
    """``hint`` without its ``None`` (``int | None`` -> ``int``)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        rest = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def choices_of(field: dataclasses.Field, hint: Any) -> tuple[str, ...] | None:
    """The names a field takes: its :class:`About`'s choices, or the values of its ``Literal`` type."""
    kind = base_type(hint)
    if typing.get_origin(kind) is Literal:
        return tuple(typing.get_args(kind))
    return about(field).choices


def _problem(value: Any, field: dataclasses.Field, hint: Any) -> tuple[str, str] | None:
    """(problem, fix) if ``value`` is not a value of ``field``, else None."""
    info, kind = about(field), base_type(hint)
    if value is None and optional(hint):
        return None
    choices = choices_of(field, hint)
    if choices is not None:
        return None if value in choices else (f"unknown value {value!r}", f"Choose one of {', '.join(choices)}.")
    allowed = info.allowed
    if isinstance(allowed, Names):
        problem = allowed.problem(value)
        return None if problem is None else (problem, f"Give {allowed.what}, e.g. {allowed.example}.")
    if allowed is not None:
        problem = allowed.problem(value)
        return None if problem is None else (problem, f"Set {field.name} to {allowed.describe()}.")
    if kind is bool and not isinstance(value, bool):
        return f"must be True or False, got {value!r}", "Pass True or False."
    return None


def check_fields(instance: Any) -> None:
    """Check every field of the dataclass ``instance`` against its :class:`About` and type.

    Raises:
        ConfigError: for the first field whose value it does not take, naming the field and the fix.
    """
    types_ = hints(type(instance))
    for field in dataclasses.fields(instance):
        found = _problem(getattr(instance, field.name), field, types_[field.name])
        if found is not None:
            raise ConfigError(type(instance).__name__, field.name, *found)
