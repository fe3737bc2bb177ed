"""The collapse warning names the cause it saw: a learning rate too high (the loss above the constant prediction's,
or at it in a run long enough to have learned), or a run too short for its schedule (8 steps) at any rate."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_helpers import tiny_train_args, write_tiny_data, write_tiny_model

from adalora.run.collapse import OVERSHOOT, SHORT_RUN_STEPS, Collapse, collapse_message, guard_epoch

H = math.log(2)  # the constant prediction's loss on two balanced classes
COUNTS = ([50, 50], [50, 50])


def cause(train_loss: float, total_steps: int) -> str:
    found = Collapse(train_loss, H, 0.5, 0.5)
    return collapse_message(found, 1, 2, lr=5e-3, scale=8.0, total_steps=total_steps).partition("Likely cause: ")[2]


@pytest.mark.parametrize("steps", [1, 8, SHORT_RUN_STEPS - 1])
def test_a_short_run_at_the_constant_loss_is_told_it_is_short_not_that_its_rate_is_too_high(steps: int) -> None:
    text = cause(0.70, steps)
    assert text.startswith("too few steps") and f"has {steps} optimizer step" in text
    assert "too high" not in text and "--epochs" in text and "0.005" in text


@pytest.mark.parametrize("steps", [SHORT_RUN_STEPS, 186])
def test_a_long_run_at_the_constant_loss_is_told_its_rate_is_too_high_or_too_low(steps: int) -> None:
    text = cause(0.70, steps)
    assert text.startswith("learning rate 0.005 too high for this model and adapter scale alpha/r = 8")
    assert "learning too slowly" in text and "too few steps" not in text


@pytest.mark.parametrize("loss", [OVERSHOOT * H * 1.01, 4.12, float("nan"), float("inf")])
def test_a_loss_above_the_constant_prediction_is_an_overshoot_however_short_the_run(loss: float) -> None:
    for steps in (8, 186):
        text = cause(loss, steps)
        assert text.startswith("learning rate 0.005 too high") and "rose above the constant prediction" in text
    assert cause(OVERSHOOT * H * 0.99, 8).startswith("too few steps")  # at H within the margin: not an overshoot


def test_the_guard_passes_the_runs_length_to_the_warning() -> None:
    short = guard_epoch({}, 1, 1, 0.70, 0.50, *COUNTS, lr=5e-3, scale=8.0, total_steps=8)
    long = guard_epoch({}, 1, 1, 0.70, 0.50, *COUNTS, lr=5e-3, scale=8.0, total_steps=186)
    assert short is not None and "too few steps" in short
    assert long is not None and "too high" in long


def test_an_8_step_run_at_the_default_rate_is_called_short(tmp_path, capsys) -> None:
    """The tiny BERT on 48 sentences, one epoch of batches of 6: 8 steps, at chance, at the default lr 5e-3."""
    from adalora.cli import main

    model, data = write_tiny_model(tmp_path / "model"), write_tiny_data(tmp_path / "data")
    threads = torch.get_num_threads()
    try:
        args = tiny_train_args(model, data, tmp_path / "run", "--epochs", "1", "--batch-size", "6")
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert printed.count("the run looks collapsed") == 1, printed
    assert "Likely cause: too few steps: the run has 8 optimizer steps in all" in printed
    assert "too high" not in printed
    verdict = json.loads((tmp_path / "run" / "metrics.json").read_text())["collapse"]
    assert verdict is not None and "too few steps" in verdict["message"]
