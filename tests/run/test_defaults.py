"""Default learning rates: the scale rule against hand computations, the values the docs quote, bad input,
and that ``adalora train`` uses them."""

from __future__ import annotations

import math

import pytest
import torch
from cli_helpers import write_tiny_data, write_tiny_model

from adalora.run.defaults import RULES, default_lr, describe_defaults, training_rank


def test_lora_is_at_its_base_up_to_the_reference_scale_and_lowered_beyond() -> None:
    assert default_lr("lora", 2, 16.0) == pytest.approx(1e-3)  # the reference: s = 16 / sqrt(2)
    assert default_lr("lora", 8, 16.0) == pytest.approx(1e-3)  # smaller scale: not raised
    assert default_lr("lora", 64, 16.0) == pytest.approx(1e-3)
    # r = 1: s = 16, lr = 1e-3 x (16 / sqrt 2) / 16 = 1e-3 / sqrt 2
    assert default_lr("lora", 1, 16.0) == pytest.approx(7.0711e-4, rel=1e-4)
    assert default_lr("lora", 2, 32.0) == pytest.approx(5e-4)  # twice the scale, half the rate
    assert default_lr("lora", 8, 32.0) == pytest.approx(1e-3)  # 32 / sqrt 8 = 16 / sqrt 2: the reference


def test_adalora_and_pruned_lora_by_their_initial_rank() -> None:
    assert default_lr("adalora", 3) == pytest.approx(5e-3)
    assert default_lr("adalora", 12) == pytest.approx(5e-3)
    assert default_lr("adalora", 2) == pytest.approx(5e-3 * math.sqrt(2 / 3))  # 4.0825e-3
    assert default_lr("pruned-lora", 3) == pytest.approx(1e-3)
    assert default_lr("pruned-lora", 12) == pytest.approx(1e-3)
    assert default_lr("pruned-lora", 1) == pytest.approx(1e-3 * math.sqrt(1 / 3))


def test_full_fine_tuning_has_no_scale() -> None:
    assert default_lr("full", None) == default_lr("full", 3, 99.0) == 5e-5


@pytest.mark.parametrize("method", ["adalora", "lora", "pruned-lora"])
def test_the_step_in_weight_space_never_exceeds_the_measured_one(method: str) -> None:
    rule = RULES[method]
    for alpha in (8.0, 16.0, 32.0, 64.0):
        for rank in range(1, 33):
            assert default_lr(method, rank, alpha) * alpha / math.sqrt(rank) <= rule.base * rule.reference_scale * (
                1 + 1e-12
            )
            assert default_lr(method, rank, alpha) <= rule.base


def test_training_rank() -> None:
    assert training_rank("lora", 4, 8, 12) == 4
    assert training_rank("lora", None, 8, 12) == 8
    assert training_rank("adalora", None, 8, 12) == 12
    assert training_rank("pruned-lora", 2, 8, 3) == 3
    assert training_rank("full", 4, 8, 12) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [(("dora", 2), "unknown method 'dora'"), (("lora", 0), "at least 1"), (("lora", 2, 0.0), "--alpha")],
)
def test_bad_input_is_a_clear_error(args, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        default_lr(*args)


def test_the_help_text_quotes_the_values() -> None:
    text = describe_defaults()
    assert "adalora 0.005, lora 0.001, pruned-lora 0.001 at alpha 16 and rank >= 3, 2, 3" in text
    assert "lora r=1: 0.00071" in text and "full 5e-05" in text


@pytest.mark.parametrize(("method", "extra", "expected"), [("lora", {"lora_r": 1}, 1e-3 / math.sqrt(2))])
def test_a_run_uses_the_default(method: str, extra: dict, expected: float, tmp_path) -> None:
    from adalora.run.settings import RunSettings
    from adalora.run.train import prepare

    model, data = write_tiny_model(tmp_path / "model"), write_tiny_data(tmp_path / "data")
    settings = RunSettings(
        model=str(model), train_file=str(data / "train.csv"), eval_file=str(data / "eval.csv"), max_length=16,
        batch_size=8, method=method, threads=1, device="cpu", **extra,
    )  # fmt: skip
    threads = torch.get_num_threads()
    try:
        _, _, method = prepare(settings, log=lambda line: None)
        assert method.lr == pytest.approx(expected)
        assert method.optimizer.param_groups[0]["initial_lr"] == pytest.approx(expected)
        assert prepare(settings.replace(lr=0.25), log=lambda line: None)[2].lr == 0.25  # --lr wins
    finally:
        torch.set_num_threads(threads)
