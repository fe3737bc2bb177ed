"""Runs are named after the model, the task and the method (``runs/smollm2-causal-lm-adalora``): the default output
directory, the run's first line, its rank heatmap's title and ``adalora inspect`` use that one name; a second run of
the same name is refused, never mixed into the first. ``inspect`` also shows where and how the run computed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cli_helpers import tiny_train_args, write_tiny_data, write_tiny_model

import adalora.run.outputs
from adalora.cli import main
from adalora.cli.inspect import hardware
from adalora.run.names import default_output_dir, model_name, run_name
from adalora.run.settings import RunSettings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (None, "minilm"),  # the packaged model of the task
        ("models/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),  # GGUF quantization suffix dropped
        ("Qwen2.5-0.5B-Instruct-Q4_K_M.gguf", "qwen2.5-0.5b-instruct"),
        ("llama-7b-f16.gguf", "llama-7b"),
        ("/data/My Model (v2)/", "my-model-v2"),
        ("~/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-360M/snapshots/" + "a" * 40, "smollm2-360m"),
        (".", "model"),
    ],
)
def test_model_names(model: str | None, expected: str) -> None:
    assert model_name(model, "minilm") == expected


def test_run_names_are_model_task_and_method() -> None:
    assert run_name(RunSettings(task="causal-lm")) == "smollm2-causal-lm-adalora"  # the packaged SmolLM2
    assert run_name(RunSettings()) == "minilm-rotten-tomatoes-adalora"
    files = RunSettings(model="models/tiny-bert", train_file="data/train.csv", eval_file="e.csv", method="lora")
    assert run_name(files) == "tiny-bert-classification-lora"  # not "train": a file's name is not a task
    lm = RunSettings(task="causal-lm", model="m/SmolLM2-135M-Instruct.Q4_1.gguf", train_file="chats.jsonl")
    assert default_output_dir(lm) == Path("runs/smollm2-135m-instruct-causal-lm-adalora")


def test_hardware_line_reads_the_saved_settings() -> None:
    settings = {"device": "cuda", "precision": "bf16", "quantize": "bnb-4bit", "gradient_checkpointing": True}
    line = hardware(settings | {"threads": 2}, {"quantized_layers": 14})
    assert line == "on cuda in bf16, base quantized bnb-4bit (14 linear layers), gradient checkpointing on, 2 threads"
    plain = settings | {"device": "cpu", "precision": "fp32", "quantize": "none", "gradient_checkpointing": False}
    assert hardware(plain | {"threads": 1}, {}) == (
        "on cpu in fp32, base not quantized, gradient checkpointing off, 1 thread"
    )


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("assets")
    return write_tiny_model(root / "tiny-bert"), write_tiny_data(root / "data")


def without_output_dir(args: list[str]) -> list[str]:
    i = args.index("--output-dir")
    return args[:i] + args[i + 2 :]


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.rglob("*.*")}


def test_a_run_without_output_dir_is_named_after_model_task_and_method(assets, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    titles = []
    draw = adalora.run.outputs.plot_rank_heatmap
    monkeypatch.setattr(
        adalora.run.outputs, "plot_rank_heatmap", lambda *a, **k: titles.append(k["title"]) or draw(*a, **k)
    )
    args = without_output_dir(tiny_train_args(*assets, tmp_path, "--precision", "bf16", "--gradient-checkpointing"))
    assert main(args) == 0
    name = "tiny-bert-classification-adalora"
    out = tmp_path / "runs" / name
    printed = capsys.readouterr().out
    assert f"\n{name}: 48 train / 16 eval examples, 12 steps" in printed
    assert printed.rstrip().endswith(f"outputs in {Path('runs') / name}")
    assert json.loads((out / "run.json").read_text())["derived"]["name"] == name
    assert titles == [f"Final ranks of {name} (total 24)"]

    assert main(["inspect", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"run: {name} (48 train / 16 eval examples of train.csv), model {assets[0]}"
    assert lines[2].strip() == "on cpu in bf16, base not quantized, gradient checkpointing on, 1 thread"

    before = digest(out)
    assert main(args) == 2  # the same run again: refused, the first one untouched
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{Path('runs') / name} already holds a run" in err and "--output-dir" in err
    assert digest(out) == before
    assert main([*args, "--method", "lora"]) == 0  # another method is another name
    assert (tmp_path / "runs" / "tiny-bert-classification-lora" / "metrics.json").is_file()
