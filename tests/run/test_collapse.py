"""The collapse guard: constant-prediction loss and majority rate against hand computations, the two-signal
rule, bad input, one warning per run, and a run forced to collapse (huge lr on a tiny model) end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_helpers import tiny_train_args, write_tiny_data, write_tiny_model

from adalora.run.collapse import (
    constant_prediction_loss,
    detect_collapse,
    guard_epoch,
    majority_rate,
)


def test_constant_prediction_loss_is_the_label_entropy() -> None:
    assert constant_prediction_loss([5, 5]) == pytest.approx(math.log(2))  # 0.693147
    # -(3/4 ln 3/4 + 1/4 ln 1/4) = 0.215762 + 0.346574
    assert constant_prediction_loss([3, 1]) == pytest.approx(0.562335, abs=1e-6)
    # -(1/2 ln 1/2 + 2 x 1/4 ln 1/4) = 0.346574 + 0.693147
    assert constant_prediction_loss([2, 1, 1]) == pytest.approx(1.039721, abs=1e-6)
    assert constant_prediction_loss([7, 0]) == 0.0  # one class: a constant prediction is perfect
    assert constant_prediction_loss([0, 4, 4]) == pytest.approx(math.log(2))  # an absent class adds nothing


def test_majority_rate() -> None:
    assert majority_rate([3, 1]) == 0.75
    assert majority_rate([10, 30, 60]) == 0.6


@pytest.mark.parametrize(
    ("train_loss", "accuracy", "collapsed"),
    [
        (0.700, 0.510, True),  # loss above H = ln 2, accuracy at the majority rate 0.51
        (0.690, 0.490, True),  # within 2 % of H; a constant prediction of the minority class (0.49)
        (0.680, 0.515, True),  # 0.680 >= 0.98 ln 2 = 0.6793; 0.515 <= 0.51 + 0.01
        (0.675, 0.500, False),  # 0.675 < 0.6793: the loss has left the constant prediction
        (0.690, 0.700, False),  # slow start: loss still near H but the model already ranks examples right
        (0.690, 0.530, False),  # 0.53 > 0.52
        (float("nan"), 0.510, True),  # a diverged run: NaN loss counts as flat-or-above
        (float("inf"), 0.900, False),  # diverged loss but accurate predictions: not a constant predictor
    ],
)
def test_both_signals_are_needed(train_loss: float, accuracy: float, collapsed: bool) -> None:
    found = detect_collapse(train_loss, accuracy, [1000, 1000], [51, 49])
    assert (found is not None) == collapsed
    if found is not None:
        assert found.constant_loss == pytest.approx(math.log(2)) and found.majority_rate == 0.51


def test_imbalanced_task() -> None:
    # 86.4 % / 13.6 %: H = -(0.864 ln 0.864 + 0.136 ln 0.136) = 0.126302 + 0.271334 = 0.397636
    train, held = [864, 136], [866, 134]
    assert constant_prediction_loss(train) == pytest.approx(0.397636, abs=1e-6)
    assert detect_collapse(0.40, 0.866, train, held) is not None  # at H and at the majority rate
    assert detect_collapse(0.25, 0.866, train, held) is None  # at the majority rate, but the loss is learning
    assert detect_collapse(0.40, 0.95, train, held) is None


def test_tolerances_are_parameters() -> None:
    assert detect_collapse(0.60, 0.5, [1, 1], [1, 1]) is None
    assert detect_collapse(0.60, 0.5, [1, 1], [1, 1], loss_tolerance=0.2) is not None  # 0.6 >= 0.8 ln 2
    assert detect_collapse(0.70, 0.55, [1, 1], [1, 1]) is None
    assert detect_collapse(0.70, 0.55, [1, 1], [1, 1], accuracy_tolerance=0.1) is not None


@pytest.mark.parametrize(
    ("train", "held", "accuracy", "message"),
    [
        ([], [1, 1], 0.5, "train_label_counts"),
        ([0, 0], [1, 1], 0.5, "train_label_counts"),
        ([3, -1], [1, 1], 0.5, "train_label_counts"),
        ([1, 1], [0], 0.5, "eval_label_counts"),
        ([1, 1], [1, 1], 1.5, "eval_accuracy"),
    ],
)
def test_bad_input_is_a_clear_error(train, held, accuracy, message) -> None:
    with pytest.raises(ValueError, match=message):
        detect_collapse(0.7, accuracy, train, held)


def test_guard_warns_once_and_keeps_the_final_epochs_verdict() -> None:
    state: dict = {}
    counts = ([50, 50], [50, 50])
    first = guard_epoch(state, 1, 3, 0.70, 0.50, *counts, lr=2e-3, scale=8.0, total_steps=186)
    assert first is not None and "after epoch 1 of 3:" in first and "2e-3" not in first  # printed as 0.002
    assert "0.002" in first and "alpha/r = 8" in first and "--lr" in first and "0.6931" in first
    # one warning per run
    assert guard_epoch(state, 2, 3, 0.70, 0.50, *counts, lr=2e-3, scale=8.0, total_steps=186) is None
    assert state["collapse"]["epoch"] == 2 and state["collapse_epochs"] == [1, 2]
    assert guard_epoch(state, 3, 3, 0.30, 0.90, *counts, lr=2e-3, scale=8.0, total_steps=186) is None
    assert state["collapse"] is None and state["collapse_epochs"] == [1, 2]  # recovered by the last epoch
    # full fine-tuning: no scale
    assert guard_epoch({}, 3, 3, 0.70, 0.50, *counts, lr=5e-5, scale=None, total_steps=186) is not None


def test_a_huge_learning_rate_collapses_a_tiny_run_and_the_guard_says_so(tmp_path, capsys) -> None:
    from adalora.cli import main

    model, data = write_tiny_model(tmp_path / "model"), write_tiny_data(tmp_path / "data")
    threads = torch.get_num_threads()
    try:
        out = tmp_path / "run"
        assert main(tiny_train_args(model, data, out, "--method", "lora", "--lr", "10")) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert printed.count("the run looks collapsed") == 1, printed
    assert "learning rate 10 too high" in printed and "alpha/r = 8" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["collapse"] is not None and metrics["collapse"]["final_epoch"] is True
    assert metrics["collapse_epochs"] and metrics["collapse_epochs"][-1] == 2
    assert metrics["collapse"]["eval_accuracy"] == metrics["eval_accuracy"]
    assert "--lr" in metrics["collapse"]["message"]
