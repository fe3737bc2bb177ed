"""Reading conversations (adalora.run.chat_data, through adalora.run.lm_data.read_lm_examples): the two forms,
and every malformed conversation refused in one line that names the file, the example and the message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adalora.run.chat_data import Conversation, Conversations
from adalora.run.data import DataError
from adalora.run.lm_data import LMExamples, hold_out, lm_task, read_lm_examples


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


CHAT = {"messages": [system("be brief"), user("hi"), assistant("hello"), user("bye"), assistant("ok bye")]}
TRL = {"prompt": [user("hi"), assistant("hello"), user("bye")], "completion": [assistant("ok bye")]}


def write(path: Path, *records: object) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_messages_rows_are_read_as_conversations_with_their_example_numbers(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CHAT) + "\n\n" + json.dumps({"messages": [user("hi"), assistant("yes")]}) + "\n")
    examples = read_lm_examples(path)
    assert isinstance(examples, Conversations) and examples.kind == "messages" and len(examples) == 2
    first, second = examples.items
    assert first.messages == tuple((m["role"], m["content"]) for m in CHAT["messages"])
    assert (first.prompt_length, first.number, second.number) == (0, 1, 2)  # example numbers skip blank lines
    assert first.trainable() == [2, 4] and second.trainable() == [1]
    assert first.as_dicts(2) == CHAT["messages"][:2]


def test_trl_prompt_completion_form_trains_only_the_completions_assistant_turns(tmp_path):
    examples = read_lm_examples(write(tmp_path / "trl.jsonl", TRL, TRL))
    assert isinstance(examples, Conversations) and examples.kind == "conversational prompt-completion"
    conversation = examples.items[0]
    assert conversation.prompt_length == 3 and len(conversation.messages) == 4
    assert conversation.trainable() == [3]  # the assistant turn of the prompt is context only


def test_held_out_split_and_limits_keep_the_example_numbers(tmp_path):
    rows = [{"messages": [user(f"question {i}"), assistant(f"answer {i}")]} for i in range(20)]
    task = lm_task(write(tmp_path / "chat.jsonl", *rows), max_train=5)
    assert isinstance(task.train, Conversations) and (len(task.train), len(task.eval)) == (5, 2)
    for split in (task.train, task.eval):
        for conversation in split.items:  # the number still names the conversation's line
            assert conversation.messages[0][1] == f"question {conversation.number - 1}"
    train, held_out = hold_out(task.train)
    assert {c.number for c in train.items}.isdisjoint(c.number for c in held_out.items)
    assert task.train.where(task.train.items[0]) == f"{tmp_path / 'chat.jsonl'}: example {task.train.items[0].number}"


def test_train_and_eval_files_must_hold_the_same_form(tmp_path):
    chat = write(tmp_path / "chat.jsonl", CHAT, CHAT)
    text = write(tmp_path / "text.jsonl", {"text": "a b"}, {"text": "c d"})
    with pytest.raises(DataError, match="holds text examples but .*chat.jsonl holds messages examples"):
        lm_task(chat, text)
    assert isinstance(lm_task(chat, write(tmp_path / "eval.jsonl", CHAT)).eval, Conversations)


# One malformed record each (as the second line of a file whose first line is good), and the one line it gets.
BAD_ROWS = [
    ("role-missing", {"messages": [{"content": "hi"}, assistant("a")]},
     "example 2: 'messages' message 1 has no 'role'"),
    ("role-unknown", {"messages": [{"role": "tool", "content": "x"}, assistant("a")]},
     "message 1 has the role \"tool\"; roles are system, user, assistant"),
    ("content-empty", {"messages": [user("hi"), assistant("  ")]}, "message 2 (assistant) has an empty 'content'"),
    ("content-missing", {"messages": [{"role": "user"}, assistant("a")]}, "message 1 (user) has no 'content'"),
    ("content-not-text", {"messages": [user("hi"), {"role": "assistant", "content": [{"type": "text"}]}]},
     "message 2 (assistant) has 'content' [{\"type\": \"text\"}], not text"),
    ("content-number", {"messages": [user("hi"), {"role": "assistant", "content": 4}]}, "has 'content' 4, not text"),
    ("key-unknown", {"messages": [user("hi"), {**assistant("a"), "name": "bot"}]}, "has the key 'name'"),
    ("message-not-object", {"messages": [user("hi"), "hello"]}, "message 2 is \"hello\", not an object"),
    ("messages-empty", {"messages": []}, "'messages' is [], not a list of messages"),
    ("messages-not-list", {"messages": "hi"}, "'messages' is \"hi\", not a list of messages"),
    ("no-assistant", {"messages": [system("s"), user("hi")]}, "example 2: it has no assistant message"),
    ("starts-with-assistant", {"messages": [assistant("hi"), user("a"), assistant("b")]},
     "starts with an assistant message"),
    ("mixed-prompt-completion", {"prompt": "hi", "completion": " yes"},
     "example 2 is a prompt-completion row but example 1 is a messages row; write every example of a file in one"),
    ("mixed-text", {"text": "hi"}, "example 2 is a text row but example 1 is a messages row"),
    ("mixed-trl", TRL, "example 2 is a conversational prompt-completion row but example 1 is a messages row"),
    ("without-messages", {"question": "hi"}, "example 2: 'messages' is missing, not a list of messages"),
]  # fmt: skip


@pytest.mark.parametrize(("record", "message"), [c[1:] for c in BAD_ROWS], ids=[c[0] for c in BAD_ROWS])
def test_malformed_conversations_are_refused_in_one_line_with_the_example(tmp_path, record, message):
    path = write(tmp_path / "chat.jsonl", CHAT, record, CHAT)
    with pytest.raises(DataError) as error:
        read_lm_examples(path)
    text = str(error.value)
    assert message in text and text.startswith(f"{path}: example 2") and "\n" not in text


BAD_TRL = [
    ("completion-without-assistant", {"prompt": [user("hi")], "completion": [user("more")]},
     "example 2: its completion has no assistant message"),
    ("prompt-missing", {"completion": [assistant("a")]}, "'prompt' is missing, not a list of messages"),
    ("completion-text", {"prompt": [user("hi")], "completion": "a"}, "'completion' is \"a\", not a list of messages"),
    ("mixed-messages", CHAT, "example 2 is a messages row but example 1 is a conversational prompt-completion row"),
]  # fmt: skip


@pytest.mark.parametrize(("record", "message"), [c[1:] for c in BAD_TRL], ids=[c[0] for c in BAD_TRL])
def test_malformed_prompt_completion_conversations_are_refused(tmp_path, record, message):
    path = write(tmp_path / "trl.jsonl", TRL, record)
    with pytest.raises(DataError, match="example 2") as error:
        read_lm_examples(path)
    assert message in str(error.value)


def test_a_conversation_in_a_prompt_completion_text_file_is_mixed_formats(tmp_path):
    path = write(tmp_path / "pc.jsonl", {"prompt": "hi", "completion": " yes"}, CHAT)
    with pytest.raises(DataError, match="example 2 is a messages row but example 1 is a prompt-completion row"):
        read_lm_examples(path)
    assert isinstance(read_lm_examples(write(tmp_path / "ok.jsonl", {"prompt": "a", "completion": "b"})), LMExamples)


def test_a_messages_column_of_a_csv_file_is_text_not_a_conversation(tmp_path):
    path = tmp_path / "chat.csv"
    path.write_text('messages\n"[{""role"": ""user""}]"\n')
    with pytest.raises(DataError, match="is .* not a list of messages.*need a .jsonl file"):
        read_lm_examples(path)


def test_conversation_take_and_head():
    items = tuple(Conversation((("user", "q"), ("assistant", str(i))), 0, i + 1) for i in range(4))
    conversations = Conversations(items, "f.jsonl", "messages")
    assert conversations.head(2).items == items[:2] and conversations.head(None) is conversations
    assert conversations.take([3, 0]).items == (items[3], items[0]) and conversations.take([1]).path == "f.jsonl"
