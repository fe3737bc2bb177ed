"""The data stage of a run, and the two kinds of task it trains: sequence classification (data.py) and causal
language modelling (lm_data.py). What differs between them, from reading the examples to scoring the model, is one
entry of :data:`KINDS`; the stages look a task's kind up by ``settings.task`` (:func:`kind_of`).

The stage comes in two steps around the model stage, which loads the tokenizer: :func:`read_task` (the examples,
first, so that a bad file is reported before a model loads) and :func:`encode` (the tensors).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .chat_data import Conversations
from .chat_template import encode_chat
from .data import DataError, Task, builtin_task, file_task
from .data import encode as encode_classes
from .defaults import kind_name
from .evaluate import Evaluator, evaluate_accuracy, evaluate_perplexity
from .lm_data import LMData, LMTask, encode_lm, lm_task
from .lm_loss import next_token_loss
from .settings import CAUSAL_LM, RunSettings

AnyTask = Task | LMTask  # a task's examples, of either kind
Tensors = dict[str, torch.Tensor]
Loss = Callable[[nn.Module, Tensors], torch.Tensor]


def classification_task(settings: RunSettings) -> Task:
    """The user's train and eval files, or a built-in task; cut to ``max_train``/``max_eval``."""
    if (settings.train_file is None) != (settings.eval_file is None):
        raise DataError("give both --train and --eval (or neither, for a built-in --task)")
    if settings.train_file is not None:
        assert settings.eval_file is not None
        columns = (settings.text_column, settings.label_column, settings.text_pair_column)
        task = file_task(settings.train_file, settings.eval_file, *columns)
    else:
        task = builtin_task(settings.task)
    return Task(task.name, task.train.head(settings.max_train), task.eval.head(settings.max_eval), task.label_names)


def text_task(settings: RunSettings) -> LMTask:
    """The user's files (the eval split held out of train when not given), or the built-in text.

    Raises:
        DataError: also for ``--assistant-loss last`` on data without conversations (it would change nothing).
    """
    files = (settings.train_file, settings.eval_file, settings.text_column)
    task = lm_task(*files, settings.max_train, settings.max_eval)
    if settings.assistant_loss != "all" and not isinstance(task.train, Conversations):
        raise DataError(
            f"--assistant-loss {settings.assistant_loss} chooses assistant turns of conversations, and "
            f"{settings.train_file or 'the built-in text'} holds {task.train.kind} examples; drop --assistant-loss"
        )
    return task


def classification_tensors(tokenizer: Any, examples: Any, settings: RunSettings) -> Tensors:
    """Rows of ``settings.max_length`` tokens, one per example (:func:`adalora.run.data.encode`)."""
    return encode_classes(tokenizer, examples, settings.max_length)


def text_tensors(tokenizer: Any, examples: LMData, settings: RunSettings) -> Tensors:
    """Rows of ``settings.max_length`` tokens for next-token training: conversations through the chat template
    (:func:`adalora.run.chat_template.encode_chat`), text and prompt/completion examples as they are
    (:func:`adalora.run.lm_data.encode_lm`)."""
    if isinstance(examples, Conversations):
        return encode_chat(tokenizer, examples, settings.max_length, settings.assistant_loss)
    return encode_lm(tokenizer, examples, settings.max_length)


@dataclass(frozen=True)
class Kind:
    """What one kind of task does at each stage.

    Attributes:
        read: the task's examples, from the settings.
        encode: ``(tokenizer, examples, settings) -> tensors`` of fixed-length rows.
        evaluate: ``(model, tensors, batch_size) -> scores`` on the held-out split.
        loss: the training loss of a batch (None: the model's own ``loss``).
        metric: the score a run reports: ``accuracy`` (higher is better) or ``perplexity`` (lower).
        score_before: whether the held-out split is scored before training too (a language model's perplexity
            means something untrained; a fresh classification head's accuracy does not).
        packaged: the model used without ``--model``, as the run's first line names it.
        packaged_name: its short name, in the run's name (names.py).
    """

    read: Callable[[RunSettings], AnyTask]
    encode: Callable[[Any, Any, RunSettings], Tensors]
    evaluate: Evaluator
    loss: Loss | None
    metric: str
    score_before: bool
    packaged: str
    packaged_name: str


KINDS: dict[str, Kind] = {
    "classification": Kind(
        classification_task, classification_tensors, evaluate_accuracy, None, "accuracy", False,
        "the packaged all-MiniLM-L6-v2", "minilm",
    ),
    CAUSAL_LM: Kind(
        text_task, text_tensors, evaluate_perplexity, next_token_loss, "perplexity", True, "the packaged SmolLM2-135M",
        "smollm2",
    ),
}  # fmt: skip


def kind_of(task: str) -> Kind:
    """The kind of the ``--task`` ``task``: causal-lm, or classification (every built-in task, and files)."""
    return KINDS[kind_name(task)]


@dataclass(frozen=True)
class Data:
    """A task's examples and their tensors: ``{name: (rows, max_length)}``, with ``labels`` of shape ``(rows,)``
    (classification) or ``(rows, max_length)`` (causal-lm: the tokens themselves, -100 where nothing is predicted)."""

    task: AnyTask
    train: Tensors
    eval: Tensors

    @property
    def rows(self) -> int:
        """Training rows (examples; for packed text, rows of ``max_length`` tokens)."""
        return len(self.train["labels"])


def read_task(settings: RunSettings, log: Callable[[str], Any]) -> AnyTask:
    """The examples of ``settings.task``, announced with the model in one line.

    Raises:
        DataError, LMError: in one line, if a file cannot be used.
    """
    kind = kind_of(settings.task)
    source = settings.train_file or ("the built-in text" if settings.task == CAUSAL_LM else settings.task)
    log(f"loading {settings.model or kind.packaged} and {source}")
    return kind.read(settings)


def encode(settings: RunSettings, task: AnyTask, tokenizer: Any) -> Data:
    """The task's examples as tensors of ``settings.max_length`` tokens."""
    kind = kind_of(settings.task)
    return Data(
        task,
        kind.encode(tokenizer, task.train, settings),
        kind.encode(tokenizer, task.eval, settings),
    )
