"""Conversations for causal-LM fine-tuning, as read from a JSON-lines file: nothing here needs a tokenizer.

Two forms, one per file:

- ``messages``: ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`` (the chat
  format of the OpenAI API, TRL and most instruction data sets);
- conversational prompt/completion (TRL's): ``{"prompt": [messages...], "completion": [messages...]}``: the
  prompt is context only, the loss is on the assistant turns of the completion.

Every conversation is checked here, before a model loads, and a malformed one is refused in one line naming the
example (its position in the file, counted from 1) and the message: a message that is no object, a missing or
unknown role, a key other than ``role`` and ``content``, content that is not text or is empty, a conversation (or a
completion) without an assistant turn. The chat template and the tokens are :mod:`adalora.run.chat_template`'s.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .data import DataError

ROLES = ("system", "user", "assistant")
ASSISTANT = "assistant"
MESSAGES = "messages"  # the column of a conversation in the messages form
Message = tuple[str, str]  # (role, content)
AssistantLoss = Literal["all", "last"]  # which assistant turns of a conversation carry the loss


@dataclass(frozen=True)
class Conversation:
    """One conversation: its messages, how many of them are the prompt (TRL's prompt/completion form; 0 for a
    ``messages`` row) and its example number in the file (from 1), which every error about it names."""

    messages: tuple[Message, ...]
    prompt_length: int
    number: int

    def trainable(self) -> list[int]:
        """Indices of the messages that may carry the loss: the assistant turns after the prompt."""
        return [i for i, (role, _) in enumerate(self.messages) if role == ASSISTANT and i >= self.prompt_length]

    def as_dicts(self, end: int | None = None) -> list[dict[str, str]]:
        """The first ``end`` messages (all when None) as ``apply_chat_template`` takes them."""
        return [{"role": role, "content": content} for role, content in self.messages[:end]]


@dataclass(frozen=True)
class Conversations:
    """The conversations of one split, the file they come from and its form (``messages`` or ``conversational
    prompt-completion``); the same interface as :class:`adalora.run.lm_data.LMExamples`."""

    items: tuple[Conversation, ...]
    path: str
    kind: str

    def __len__(self) -> int:
        return len(self.items)

    def take(self, indices: Sequence[int]) -> Conversations:
        return Conversations(tuple(self.items[i] for i in indices), self.path, self.kind)

    def head(self, limit: int | None) -> Conversations:
        """The first ``limit`` conversations (all of them when ``limit`` is None)."""
        return self if limit is None or limit >= len(self) else self.take(range(limit))

    def where(self, conversation: Conversation) -> str:
        """``<file>: example <n>``: where an error about ``conversation`` points the user."""
        return f"{self.path}: example {conversation.number}"


MESSAGES_KIND, PROMPT_COMPLETION_KIND = "messages", "conversational prompt-completion"


def conversational_kind(record: dict[str, Any], prompt_column: str, completion_column: str) -> str | None:
    """The conversational form of one record (its ``kind``), or None for a row of text or of string prompts."""
    if MESSAGES in record:
        return MESSAGES_KIND
    if isinstance(record.get(prompt_column), list) or isinstance(record.get(completion_column), list):
        return PROMPT_COMPLETION_KIND
    return None


def read_conversations(
    records: list[dict[str, Any]], path: Path, prompt_column: str = "prompt", completion_column: str = "completion"
) -> Conversations:
    """The conversations of a file whose records are all of the first record's conversational form
    (:func:`conversational_kind`; :func:`adalora.run.lm_data.read_lm_examples` refuses mixed forms).

    Raises:
        DataError: in one line with the example number, for a malformed conversation (module docstring).
    """
    kind = conversational_kind(records[0], prompt_column, completion_column)
    items = []
    for number, record in enumerate(records, start=1):
        where = f"{path}: example {number}"
        if kind == MESSAGES_KIND:
            items.append(Conversation(_messages(record.get(MESSAGES), where, MESSAGES), 0, number))
        else:
            prompt = _messages(record.get(prompt_column), where, prompt_column)
            completion = _messages(record.get(completion_column), where, completion_column)
            items.append(Conversation(prompt + completion, len(prompt), number))
        if items[-1].messages[0][0] == ASSISTANT:  # nothing before it: the template would have no header to prompt
            raise DataError(
                f"{where}: the conversation starts with an assistant message; start it with a system or user message"
            )
        if not items[-1].trainable():
            whose = "its completion has" if kind == PROMPT_COMPLETION_KIND else "it has"
            raise DataError(
                f"{where}: {whose} no assistant message, and the loss is on assistant turns; give every "
                "conversation an assistant answer"
            )
    return Conversations(tuple(items), str(path), kind)


def _messages(value: Any, where: str, column: str) -> tuple[Message, ...]:
    """The messages of one column of one record, checked (module docstring).

    Raises:
        DataError: naming ``where``, the column and the message number (from 1).
    """
    if not isinstance(value, list) or not value:
        shown = "missing" if value is None else f"{json.dumps(value)[:40]}"
        raise DataError(
            f'{where}: \'{column}\' is {shown}, not a list of messages; write [{{"role": "user", "content": "..."}}, '
            "...] (conversations need a .jsonl file)"
        )
    messages = []
    for index, message in enumerate(value, start=1):
        at = f"{where}: '{column}' message {index}"
        if not isinstance(message, dict):
            raise DataError(f'{at} is {json.dumps(message)[:40]}, not an object {{"role": ..., "content": ...}}')
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise DataError(f"{at} has the key '{extra[0]}'; a message holds only 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role is None:
            raise DataError(f"{at} has no 'role'; give one of {', '.join(ROLES)}")
        if role not in ROLES:
            raise DataError(f"{at} has the role {json.dumps(role)}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            shown = "no 'content'" if content is None else f"'content' {json.dumps(content)[:40]}, not text"
            raise DataError(f"{at} ({role}) has {shown}; write the content as a JSON string")
        if not content.strip():
            raise DataError(f"{at} ({role}) has an empty 'content'; drop the message or write its text")
        messages.append((role, content))
    return tuple(messages)
