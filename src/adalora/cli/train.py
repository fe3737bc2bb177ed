"""``adalora train``: its flags, generated from the fields of :class:`~adalora.run.settings.RunSettings` and of its
:class:`~adalora.AdaLoRAConfig` (each with what it does, its default and its allowed values), and how the flags
typed become the run's settings.

``--resume`` takes the settings saved in the run; a flag typed with it must say what the run already uses,
whatever its default: only typed flags reach the parsed namespace (:func:`~adalora.cli.arguments.add_flags`), and
the run compares those (``given``: adalora.run.check)."""

from __future__ import annotations

import argparse
import re
import signal
import sys
from pathlib import Path
from typing import Any

from ..fields import ConfigError
from ..files.atomic import WriteError
from ..run.defaults import BY_TASK, by_task
from ..run.directory import how_to_continue
from ..run.names import default_output_dir
from ..run.settings import CONFIG_FIELDS, DERIVED, RUN_FIELDS, RunError, RunSettings, flag, task_defaults
from ..run.train import run
from .arguments import UsageError, add_flags

SubParsers = Any  # argparse's private _SubParsersAction

# The parts of ``adalora train --help``: the ``group`` of each RunSettings field; the AdaLoRAConfig's are "adalora".
GROUPS = {
    "data": "data",
    "model": "model and method",
    "adalora": "AdaLoRA's settings (pruned-lora too; lora reads the modules, alpha and dropout); steps are "
    "optimizer steps",
    "optimisation": "optimisation",
    "run": "run",
    "hardware": "hardware",
}


def register_train(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a classifier or a decoder (default: all-MiniLM-L6-v2 on Rotten Tomatoes sentences, offline, "
        "a few minutes)",
        description="Fine-tune a model with AdaLoRA or a baseline, for one of two kinds of task, and write metrics, "
        "adapter, rank pattern, allocation history and figures to the output directory. Classification (the "
        "built-in tasks, or --train/--eval files with text and labels): a sequence classifier, scored by accuracy; "
        "with no options, the packaged all-MiniLM-L6-v2 on Rotten Tomatoes sentence polarity. --task causal-lm: a "
        "decoder (--model, default the packaged SmolLM2-135M) on next-token loss, from prompt/completion pairs, "
        "chat conversations, or plain text, scored by perplexity on a held-out split before and after training "
        "(docs/causal-lm.md). Where a default differs by task, the help says so; try a finished causal-lm run with "
        "adalora generate.",
    )
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    add_setting_flags(groups, RunSettings())
    run_options = groups["run"]
    run_options.add_argument(
        "--output-dir", metavar="DIR",
        help="a new or empty directory, or a run of adalora with --overwrite (default: runs/<model>-<task>-<method>, "
        "e.g. runs/smollm2-causal-lm-adalora; <task> is classification for your own files)",
    )  # fmt: skip
    run_options.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    run_options.add_argument(
        "--overwrite", action="store_true", help="start over in a directory holding a run (removes only its files)"
    )
    run_options.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def add_setting_flags(groups: dict[str, Any], defaults: RunSettings) -> None:
    """A flag for every field of ``defaults`` and of its config (but T, which the run counts); the fields that the
    run derives say how, and those whose default depends on the task show each task's (defaults.BY_TASK)."""
    shown = {name: words for name, words in DERIVED.items() if name in defaults.derived}
    add_flags(groups, defaults.adalora, group="adalora", skip=("total_steps",), shown=shown, wording=_in_flags)
    per_task = {name: by_task(name) for name in BY_TASK}
    add_flags(groups, defaults, skip=("adalora", "derived"), shown=per_task, wording=_in_flags)


def typed_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``{field: value}`` of the setting flags typed (those not typed are not in ``args``: argparse.SUPPRESS)."""
    return {name: getattr(args, name) for name in (*RUN_FIELDS, *CONFIG_FIELDS) if hasattr(args, name)}


def settings_from_flags(typed: dict[str, Any], defaults: RunSettings | None = None) -> RunSettings:
    """The settings of the flags ``typed`` (``{field: value}``) over ``defaults``.

    Raises:
        UsageError: in one line naming the flags, if the values do not make valid settings together
            (``--target-r 8`` with ``--init-r 4``).
    """
    values = {name: tuple(v) if isinstance(v, list) else v for name, v in typed.items()}
    try:
        return (defaults or RunSettings()).replace(**values)
    except ConfigError as error:
        raise UsageError(_in_flags(f"{flag(error.field)}: {error.problem}. {error.fix}", every_name=True)) from None


def _in_flags(text: str, every_name: bool = False) -> str:
    """``text`` with the settings' names written as their flags (``init_r`` -> ``--init-r``): the names of two
    words or more, or (``every_name``, for messages written with it in mind) every name: ``method`` is also a word."""
    names = {*RUN_FIELDS, *CONFIG_FIELDS} - {"adalora", "derived", "total_steps"}
    names = sorted((n for n in names if every_name or "_" in n), key=len, reverse=True)
    return re.sub(rf"(?<![-\w])({'|'.join(names)})\b", lambda m: flag(m.group(1)), text)


def cmd_train(args: argparse.Namespace) -> int:
    typed = typed_settings(args)
    settings = settings_from_flags(typed, task_defaults(typed.get("task", RunSettings().task)))
    if args.resume is not None:
        if args.output_dir is not None or args.overwrite:
            raise UsageError("--resume continues a run in its own directory; drop --output-dir/--overwrite")
        output_dir, resume = Path(args.resume), True
    else:
        output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(settings)
        resume = False
    progress = not args.no_progress
    try:
        run(settings, output_dir, resume=resume, overwrite=args.overwrite, progress=progress, given=tuple(typed))
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM or SIGHUP (run/stop.py): the work so far is saved
        print(f"adalora: {stopped(stop, output_dir)}", file=sys.stderr)
        return getattr(stop, "exit_status", 128 + signal.SIGINT)
    except WriteError as error:  # a full disk: what was written before stays; say how to go on once it is fixed
        raise RunError(f"{error}; once that is fixed, {how_to_continue(output_dir)}") from None
    return 0


def stopped(stop: KeyboardInterrupt, output_dir: Path) -> str:
    """The line a run stopped by a signal ends with: where it stopped and how to continue."""
    step, total = getattr(stop, "step", None), getattr(stop, "total", None)
    where = "" if step is None else f" at step {step}/{total} (checkpoint saved)"
    return f"stopped by {getattr(stop, 'name', 'SIGINT')}{where}; {how_to_continue(output_dir)}"
