"""``adalora inspect`` (a run's settings, per-epoch metrics and final rank table) and ``adalora plot`` (redraw
its figures). Both read a run directory of ours and write nothing else."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..files.atomic import read_json
from ..files.checkpoint import CheckpointError, read_checkpoint
from ..run.directory import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    PREVIOUS_CHECKPOINT_FILE,
    RANKS_FILE,
    RUN_FILE,
    check_writable,
    is_unstarted,
    not_started,
    require_run_dir,
)
from ..run.lock import holder, locked_runs
from ..run.outputs import draw_figures
from ..run.plots import rank_grid
from ..run.settings import RunError
from ..run.tasks import kind_of
from ..run.words import plural

SubParsers = Any


def _run_dir(path: str, command: str) -> Path:
    return require_run_dir(path, f"adalora {command}")


def format_rank_table(ranks: dict[str, int]) -> str:
    """Ranks as text: one row per matrix type, one column per layer (1-based), as the heatmap."""
    types, layers, grid = rank_grid(ranks)
    header = ["", *("-" if layer is None else str(layer + 1) for layer in layers), "total"]
    rows = [header]
    for kind, row in zip(types, grid, strict=True):
        cells = ["." if v is None else str(v) for v in row]
        rows.append([kind, *cells, str(sum(v for v in row if v is not None))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def _read(directory: Path, name: str) -> dict[str, Any]:
    """A JSON file of a run; :class:`RunError` if it is damaged."""
    try:
        data = read_json(directory / name)
    except (OSError, ValueError) as error:
        raise RunError(f"{directory / name} cannot be read ({error}); the run directory is damaged") from None
    if not isinstance(data, dict):
        raise RunError(f"{directory / name} is not a JSON object; the run directory is damaged")
    return data


def cmd_inspect(args: argparse.Namespace) -> int:
    directory = _run_dir(args.output_dir, "inspect")
    if is_unstarted(directory):
        print(f"status: not started; {not_started(directory)}")
        return 0
    run = _read(directory, RUN_FILE)
    try:
        _print_run(directory, run, kind_of(run["settings"]["task"]).metric)
    except (KeyError, TypeError) as error:
        raise RunError(f"{directory}: a file of the run lacks {error}; the run directory is damaged") from None
    return 0


def _print_run(directory: Path, run: dict[str, Any], metric: str) -> None:
    settings, derived = run["settings"], run["derived"]
    data = Path(settings["train_file"]).name if settings.get("train_file") else derived["task"]
    print(
        f"run: {derived.get('name', settings['method'])} ({derived['train_examples']} train / "
        f"{derived['eval_examples']} eval examples of {data}), model {derived['model_path']}"
    )
    steps = plural(derived["total_steps"], "optimizer step")
    print(f"     {steps}, {derived['trainable_parameters']:,} trainable parameters")
    print(f"     {hardware(settings, derived)}")
    if "failure" in run:
        print(f"status: failed: {run['failure']['message']}")
        return
    if not (directory / METRICS_FILE).is_file() and (who := holder(directory)) is not None:
        print(f"status: in progress ({who})")
        return
    if not (directory / METRICS_FILE).is_file():
        _print_incomplete(directory, run)
        return
    metrics = _read(directory, METRICS_FILE)
    width = len(f"eval {metric}")
    print(f"{'epoch':>5}  {'step':>6}  {'train loss':>10}  {'eval loss':>9}  {'eval ' + metric:>{width}}")
    for e in metrics["epochs"]:
        print(
            f"{e['epoch']:>5}  {e['step']:>6}  {e['train_loss']:>10.4f}  {e['eval_loss']:>9.4f}  "
            f"{e['eval_' + metric]:>{width}.4f}"
        )
    before = metrics.get(f"eval_{metric}_before")
    print(
        f"final eval {metric} {metrics['eval_' + metric]:.4f} (best {metrics['best_eval_' + metric]:.4f}"
        f"{'' if before is None else f', before training {before:.4f}'}), "
        f"training time {metrics['train_seconds']:.0f} s, weights in {directory / metrics['weights']}"
    )
    if (directory / RANKS_FILE).is_file():
        ranks = _read(directory, RANKS_FILE)
        budget = f" of {derived['init_budget']} at the start" if "init_budget" in derived else ""
        print(f"\nfinal ranks (rows: matrix types, columns: layers), total {sum(ranks.values())}{budget}:")
        print(format_rank_table(ranks))


def hardware(settings: dict[str, Any], derived: dict[str, Any]) -> str:
    """Where and how the run computed, from its saved settings: ``on cpu in bf16, base quantized bnb-4bit (14 linear
    layers), gradient checkpointing on, 2 threads``."""
    quantize = settings["quantize"]
    if quantize == "none":
        base = "base not quantized"
    else:
        layers = derived.get("quantized_layers")
        base = f"base quantized {quantize}" + ("" if layers is None else f" ({plural(layers, 'linear layer')})")
    checkpointing = "on" if settings["gradient_checkpointing"] else "off"
    threads = f", {plural(settings['threads'], 'thread')}" if settings.get("threads") else ""
    return (
        f"on {settings['device']} in {settings['precision']}, {base}, gradient checkpointing {checkpointing}{threads}"
    )


def _print_incomplete(directory: Path, run: dict[str, Any]) -> None:
    """Where a run that has not finished stopped: its newest usable checkpoint (checked as ``--resume`` does)."""
    problems = []
    for name in (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE):
        if not (directory / name).is_file():
            continue
        try:
            state = read_checkpoint(directory / name, run.get("run_id"))
        except CheckpointError as error:
            problems.append(str(error))
            continue
        where = f"stopped at step {state['extra']['step']}/{run['derived']['total_steps']}"
        print(
            f"status: incomplete ({'; '.join([*problems, where])}); continue with: adalora train --resume {directory}"
        )
        return
    if problems:
        print(f"status: incomplete, and cannot be resumed ({'; '.join(problems)}); start it over with --overwrite")
    else:
        print(f"status: incomplete (not started); continue with: adalora train --resume {directory}")


def register_inspect(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "inspect", help="print a run's name, data, hardware settings, per-epoch metrics and final rank table"
    )
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="a directory written by adalora train")
    p.set_defaults(func=cmd_inspect)


def cmd_plot(args: argparse.Namespace) -> int:
    with locked_runs([Path(args.output_dir)], "plot", fix=""):  # not while a run writes its own figures there
        directory = _run_dir(args.output_dir, "plot")
        check_writable(directory, "adalora plot", "make it writable, or copy the run somewhere writable")
        try:
            drawn = draw_figures(directory)
        except (KeyError, TypeError) as error:
            raise RunError(f"{directory}: a file of the run lacks {error}; the run directory is damaged") from None
    if not drawn:
        print(f"nothing to plot in {directory}: no rank pattern (full fine-tuning, or the run is incomplete)")
    for path in drawn:
        print(path)
    return 0


def register_plot(subparsers: SubParsers) -> None:
    p = subparsers.add_parser("plot", help="redraw a run's rank heatmap and budget curve (PNG)")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="a directory written by adalora train")
    p.set_defaults(func=cmd_plot)
