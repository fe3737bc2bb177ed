import dataclasses
import re

import pytest

from adalora import AdaLoRAConfig


@pytest.mark.parametrize(
    ("changes", "field", "phrase"),
    [
        ({"init_r": 8, "target_r": 8}, "target_r", "smaller than init_r"),
        ({"init_r": 4, "target_r": 6}, "target_r", "smaller than init_r"),
        ({"total_steps": 700, "warmup_steps": 200, "final_steps": 500}, "total_steps", "no budgeting phase"),
        ({"total_steps": 100, "warmup_steps": 80, "final_steps": 30}, "total_steps", "no budgeting phase"),
        ({"mask_interval": 0}, "mask_interval", ">= 1"),
        ({"beta1": 0.0}, "beta1", "between 0 and 1"),
        ({"beta2": 1.0}, "beta2", "between 0 and 1"),
        ({"beta1": 1.5}, "beta1", "between 0 and 1"),
        ({"orth_reg_weight": -0.1}, "orth_reg_weight", ">= 0"),
        ({"alpha": -1.0}, "alpha", "> 0"),
        ({"alpha": 0.0}, "alpha", "> 0"),
        ({"warmup_steps": -1}, "warmup_steps", ">= 0"),
        ({"final_steps": -5}, "final_steps", ">= 0"),
        ({"total_steps": -3}, "total_steps", ">= 1"),
        ({"init_r": 0, "target_r": None, "target_total_rank": 4}, "init_r", ">= 1"),
        ({"dropout": 1.0}, "dropout", "[0, 1)"),
        ({"dropout": -0.1}, "dropout", "[0, 1)"),
        ({"target_modules": []}, "target_modules", "non-empty"),
        ({"target_modules": ""}, "target_modules", "empty"),
        ({"target_r": None}, "target_r", "exactly one"),
        ({"target_total_rank": 10}, "target_r", "exactly one"),
        ({"importance": "fisher"}, "importance", "smoothed"),
        ({"regularizer": "l2"}, "regularizer", "reference"),
        ({"importance_timing": "whenever"}, "importance_timing", "after_step"),
        ({"init_r": 2.5}, "init_r", "integer"),
    ],
)
def test_invalid_values_name_the_field_and_the_fix(changes, field, phrase):
    with pytest.raises(ValueError) as info:
        AdaLoRAConfig(**changes)
    message = str(info.value)
    assert f"AdaLoRAConfig.{field}:" in message
    assert phrase in message
    # Every message says what to do, not only what is wrong: "<field>: <problem>. <What to do>."
    assert _problem_then_fix(message, field), message


def _problem_then_fix(message: str, field: str) -> bool:
    """True if ``message`` is ``AdaLoRAConfig.<field>: <problem>. <Fix, a sentence of 3+ words>.``"""
    match = re.fullmatch(rf"AdaLoRAConfig\.{field}: (?P<problem>.+?)\. (?P<fix>[A-Z][^\n]+\.)", message)
    return match is not None and len(match["fix"].split()) >= 3


def test_the_problem_then_fix_check_can_fail():
    assert _problem_then_fix("AdaLoRAConfig.init_r: must be >= 1, got 0. Set init_r to at least 1.", "init_r")
    assert not _problem_then_fix("AdaLoRAConfig.init_r: must be >= 1, got 0.", "init_r")  # no fix
    assert not _problem_then_fix("AdaLoRAConfig.init_r: must be >= 1, got 2.5.", "init_r")  # dots, still no fix


def test_defaults_are_valid_and_frozen():
    config = AdaLoRAConfig()
    assert config.scale == pytest.approx(16 / 12)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.init_r = 3  # type: ignore[misc]


def test_replace_returns_a_validated_copy_and_leaves_the_original():
    config = AdaLoRAConfig(total_steps=None)
    longer = config.replace(total_steps=5000)
    assert config.total_steps is None and longer.total_steps == 5000
    with pytest.raises(ValueError, match="total_steps"):
        config.replace(total_steps=10)


def test_json_round_trip_is_exact():
    config = AdaLoRAConfig(
        target_modules=["q_proj", "v_proj"],
        init_r=9,
        target_r=None,
        target_total_rank=40,
        importance="sensitivity",
        regularizer="paper",
        importance_timing="before_step",
        modules_to_save=["score"],
    )
    restored = AdaLoRAConfig.from_json(config.to_json())
    assert restored == config
    assert restored.target_modules == ("q_proj", "v_proj")
    regex = AdaLoRAConfig(target_modules=r".*\.(query|value)")
    assert AdaLoRAConfig.from_json(regex.to_json()) == regex


def test_unknown_json_fields_are_rejected():
    data = AdaLoRAConfig().to_dict() | {"lora_r": 8}
    with pytest.raises(ValueError, match="unknown field"):
        AdaLoRAConfig.from_dict(data)


def test_target_budget():
    assert AdaLoRAConfig(target_r=8).target_budget(72) == 576
    assert AdaLoRAConfig(target_r=None, target_total_rank=100).target_budget(72) == 100
