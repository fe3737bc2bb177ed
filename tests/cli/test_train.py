"""The flags of ``adalora train`` are made from the fields of RunSettings and AdaLoRAConfig (adalora/fields.py,
adalora/cli/arguments.py): a new config field is a new flag with its help and its range, and the settings the flags
make are checked by the dataclasses' own validators, reported naming the flags."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from adalora import AdaLoRAConfig
from adalora.cli.arguments import Parser, UsageError
from adalora.cli.train import GROUPS, add_setting_flags, settings_from_flags
from adalora.fields import ConfigError, Range, about, check_fields, flag, setting
from adalora.run.settings import DERIVED, RunSettings


@dataclasses.dataclass(frozen=True)
class NewConfig(AdaLoRAConfig):
    """AdaLoRAConfig with one more field, declared only here."""

    decay_power: float = setting(3.0, "exponent of the cubic budget decay", Range(float, 1), metavar="K")
    log_every: int = setting(5, "steps between log lines")  # no range: parsed as an int all the same
    keep_history: bool = setting(False, "record every allocation")


def parser_for(defaults: RunSettings) -> argparse.ArgumentParser:
    parser = Parser(prog="adalora train")
    add_setting_flags({key: parser.add_argument_group(title) for key, title in GROUPS.items()}, defaults)
    return parser


def typed(parser: argparse.ArgumentParser, argv: list[str]) -> dict:
    return vars(parser.parse_args(argv))


def test_a_new_config_field_is_a_flag_with_its_help_and_its_range(capsys) -> None:
    defaults = RunSettings(adalora=NewConfig(total_steps=None))
    parser = parser_for(defaults)
    assert helps(defaults)["decay_power"] == "exponent of the cubic budget decay (default: 3.0)"
    assert typed(parser, ["--decay-power", "2.5"]) == {"decay_power": 2.5}  # only what was typed
    settings = settings_from_flags(typed(parser, ["--decay-power", "2.5", "--epochs", "3"]), defaults)
    assert (settings.adalora.decay_power, settings.epochs, settings.adalora.init_r) == (2.5, 3, 12)
    settings = settings_from_flags(typed(parser, ["--log-every", "7", "--keep-history"]), defaults)
    assert (settings.adalora.log_every, settings.adalora.keep_history, settings.adalora.decay_power) == (7, True, 3.0)
    with pytest.raises(SystemExit) as exit:
        parser.parse_args(["--decay-power", "0.5"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        "adalora train: error: argument --decay-power: expected a number >= 1, got '0.5' (see adalora train --help)\n"
    )


def test_every_field_but_the_runs_own_has_a_flag_with_the_fields_help() -> None:
    actions = {a.dest: a for a in parser_for(RunSettings())._actions}
    for cls, skip in ((AdaLoRAConfig, {"total_steps"}), (RunSettings, {"adalora", "derived"})):
        for field in dataclasses.fields(cls):
            if field.name in skip:
                assert field.name not in actions
                continue
            action = actions[field.name]
            assert action.option_strings == [flag(field)] and action.default is argparse.SUPPRESS
            assert action.help.startswith(" ".join(about(field).help.split()[:2])), field.name
    assert actions["train_file"].option_strings == ["--train"]
    assert actions["target_total_rank"].option_strings == ["--target-total-rank"]


def helps(defaults: RunSettings) -> dict[str, str]:
    return {a.dest: a.help for a in parser_for(defaults)._actions}


def test_derived_fields_say_how_the_run_fills_them_in() -> None:
    help_of = helps(RunSettings())
    assert help_of["warmup_steps"].endswith(f"(default: {DERIVED['warmup_steps']})")
    assert help_of["modules_to_save"].endswith(f"(default: {DERIVED['modules_to_save']})")
    given = RunSettings().replace(warmup_steps=10, modules_to_save=("score",))
    assert given.derived == ("target_modules", "final_steps")
    assert (given.value("warmup_steps"), given.value("final_steps"), given.value("modules_to_save")) == (
        10,
        None,
        ("score",),
    )
    assert helps(given)["warmup_steps"] == "t_i: no masking while t <= t_i (default: 10)"  # given: shown as such


def test_values_that_do_not_go_together_are_refused_naming_the_flags() -> None:
    with pytest.raises(UsageError) as error:
        settings_from_flags({"init_r": 4, "target_r": 6})
    assert str(error.value).startswith(
        "--target-r: the final rank must be smaller than --init-r, got --target-r=6 >= --init-r=4. Lower --target-r"
    )
    with pytest.raises(UsageError, match="--quantize: bnb-4bit freezes .* --method full has nothing to train"):
        settings_from_flags({"quantize": "bnb-4bit", "method": "full"})
    with pytest.raises(UsageError, match="exactly one of --target-r and --target-total-rank"):
        settings_from_flags({"target_total_rank": 30, "target_r": 4})


def test_list_fields_take_names_and_a_field_added_to_the_config_later_has_its_flag_too() -> None:
    """``target_parameters`` was added to AdaLoRAConfig after the CLI was generated; it is a flag all the same."""
    parser = parser_for(RunSettings())
    settings = settings_from_flags(typed(parser, ["--target-parameters", "mlp.experts.down_proj", "gate_up_proj"]))
    assert settings.adalora.target_parameters == ("mlp.experts.down_proj", "gate_up_proj")
    assert "target_modules" in settings.derived  # the family's modules are still adapted beside them
    with pytest.raises(UsageError, match="--target-parameters: must be a list of parameter names"):
        settings_from_flags({"target_parameters": ("",)})


def test_the_total_rank_replaces_the_average_rank() -> None:
    settings = settings_from_flags({"target_total_rank": 30})
    assert (settings.adalora.target_r, settings.adalora.target_total_rank) == (None, 30)


def test_range_words_and_the_one_validator() -> None:
    assert Range(int, 1).describe() == "an integer >= 1"
    assert Range(float, 0, low_open=True).describe() == "a number > 0"
    assert Range(float, 0, 1, high_open=True).describe() == "a number in [0, 1)"
    assert Range(float, 0, 1, low_open=True, high_open=True).describe() == "a number strictly between 0 and 1"
    assert Range(int, 0).problem(-1) == "must be an integer >= 0, got -1"
    assert Range(float, 0).problem(float("nan")) is not None and Range(int, 0).problem(True) is not None
    assert Range(int, 1).problem(1) is None and Range(float, 0, 1, high_open=True).problem(1.0) is not None
    with pytest.raises(ValueError, match="expected an integer >= 1"):
        Range(int, 1).parse("1.5")

    @dataclasses.dataclass(frozen=True)
    class Settings:
        count: int = setting(1, "a count", Range(int, 1))

    check_fields(Settings())
    with pytest.raises(ConfigError) as error:
        check_fields(Settings(count=0))
    assert str(error.value) == "Settings.count: must be an integer >= 1, got 0. Set count to an integer >= 1."
    assert (error.value.field, error.value.problem) == ("count", "must be an integer >= 1, got 0")


def test_settings_round_trip_through_run_json() -> None:
    settings = RunSettings(epochs=3, max_grad_norm=None).replace(init_r=6, target_r=4, warmup_steps=2)
    restored = RunSettings.from_dict(settings.to_dict())
    assert restored == settings and restored.derived == ("target_modules", "modules_to_save", "final_steps")
    with pytest.raises(ValueError, match="unknown settings"):
        RunSettings.from_dict(settings.to_dict() | {"target_budget": 10})
