"""``adalora train --help`` speaks of both kinds of task: what it trains, which files and columns each reads,
that ``--eval`` is optional for causal-LM, and each default that differs by task, per task; and the run starts
from the defaults of the task it is given (``adalora.run.defaults.BY_TASK``, not a special case in the CLI)."""

from __future__ import annotations

import pytest

import adalora.cli.train
import adalora.run.defaults
from adalora.cli import build_parser, main
from adalora.run.settings import RunSettings


def help_text(capsys) -> str:
    """``adalora train --help`` as printed, its whitespace made single spaces (argparse wraps at the width)."""
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["train", "--help"])
    assert exit.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def option(flag: str) -> str:
    """The help of one option of ``adalora train`` as ``--help`` prints it (``%`` unescaped, one line)."""
    parser = train_parser()
    (action,) = [a for a in parser._actions if flag in a.option_strings]
    return " ".join(parser._get_formatter()._expand_help(action).split())


def train_parser():
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    return subparsers.choices["train"]


def test_the_description_covers_both_tasks(capsys) -> None:
    text = help_text(capsys)
    assert "Fine-tune a sequence classifier" not in text
    assert "Fine-tune a model with AdaLoRA or a baseline, for one of two kinds of task" in text
    assert "Classification (the built-in tasks, or --train/--eval files with text and labels)" in text
    assert "--task causal-lm: a decoder" in text and "perplexity on a held-out split" in text


def test_train_names_the_files_and_columns_of_each_task() -> None:
    train = option("--train")
    classification, _, causal_lm = train.partition("causal-lm:")
    assert ".csv, .tsv or .jsonl with a text and a label column (--text-column, --label-column)" in classification
    for words in ("prompt and completion columns", "chat rows with a messages list", "chat template", ".txt"):
        assert words in causal_lm, words


def test_eval_is_optional_for_causal_lm_and_says_what_is_held_out_instead() -> None:
    text = option("--eval")
    assert "classification: required with --train" in text
    assert "causal-lm: optional, without it a fixed 10% of the training records are held out" in text


def test_defaults_that_differ_by_task_are_shown_per_task(capsys) -> None:
    assert "(default: 48 for classification, 128 for causal-lm)" in help_text(capsys)  # as printed
    assert option("--max-length").endswith("(default: 48 for classification, 128 for causal-lm)")
    assert option("--modules-to-save").endswith(
        "(default: classification: the new classification head; causal-lm: none (the LM head is pretrained))"
    )
    assert "either task" in option("--target-modules") and "a decoder's q/k/v/o" in option("--target-modules")
    assert option("--max-train").startswith("first N training examples, either task")
    assert "default by method, for either task" in option("--lr")
    assert "classification: column of the labels" in option("--label-column")


@pytest.fixture
def started(monkeypatch) -> list[RunSettings]:
    """The settings ``adalora train`` would run with (the run itself replaced by a recorder)."""
    calls: list[RunSettings] = []
    monkeypatch.setattr(adalora.cli.train, "run", lambda settings, *args, **kwargs: calls.append(settings))
    return calls


@pytest.mark.parametrize(
    ("argv", "max_length"),
    [
        ([], 48),
        (["--task", "trec"], 48),
        (["--task", "causal-lm"], 128),
        (["--task", "causal-lm", "--max-length", "64"], 64),
    ],
)
def test_a_run_starts_from_its_tasks_defaults(argv: list[str], max_length: int, started, tmp_path) -> None:
    assert main(["train", *argv, "--output-dir", str(tmp_path / "run")]) == 0
    (settings,) = started
    assert settings.max_length == max_length


def test_a_setting_added_to_the_table_is_shown_and_applied_per_task(monkeypatch, started, tmp_path) -> None:
    monkeypatch.setitem(adalora.run.defaults.BY_TASK, "epochs", {"classification": 2, "causal-lm": 1})
    assert option("--epochs").endswith("(default: 2 for classification, 1 for causal-lm)")
    assert main(["train", "--task", "causal-lm", "--output-dir", str(tmp_path / "run")]) == 0
    assert started[0].epochs == 1
