"""One fine-tuning run from settings to output directory: what ``adalora train`` does.

    check (nothing written) -> load data, model, method (setup.py) -> start or resume in the output directory
    -> train with :func:`adalora.integrations.loop.fit` (callbacks.py: progress, evaluation, checkpoints)
    -> finish (outputs.py: adapter, metrics, rank pattern, allocation history, figures).

The output directory holds ``.adalora-run`` (the marker that makes it a run of ours: directory.py), ``run.json``
(the run's id, the settings and the values derived from them), ``checkpoint.pt`` and the one before it,
``checkpoint.prev.pt``, while the run is in progress (files/checkpoint.py; removed when it ends), and at the
end ``metrics.json``, ``rank_pattern.json``, ``allocation_history.json``, ``rank_heatmap.png``,
``budget_curve.png`` and the trained weights (``adapter/`` for the adapter methods, ``model/`` for full
fine-tuning). A run that diverges (divergence.py) writes none of these: ``run.json`` records it as failed.

Everything that can be refused (settings out of range, a directory that is not ours, an unwritable location,
a missing optional package, bad data, a model that does not load) is checked before the first file is written.
The run holds the lock of its directory from before those checks to its last file (lock.py), so a second
command using the directory meanwhile is refused. SIGINT, SIGTERM and SIGHUP stop it at the next optimizer step
boundary after a checkpoint (stop.py); a refused write (a full disk) leaves the files written before as they were.

Resuming (``resume=True``) rebuilds everything from ``run.json``, restores the checkpoint (trainable weights,
optimizer, LR scheduler, allocator, RNG states) and continues mid-epoch with the same data order, so a killed
run ends exactly where an uninterrupted one does. A checkpoint is used only if it proves it is this run's, as
written: a damaged newest checkpoint falls back to the previous one, anything else is refused in one line.
"""

from __future__ import annotations

import contextlib
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import parallel
from ..files.atomic import read_json, write_json
from ..files.checkpoint import CheckpointError, load_latest_checkpoint
from ..integrations.loop import FitStepReport, fit
from . import causal_lm
from .batches import TensorBatches
from .callbacks import RunCallbacks, new_state, summary_writer_class
from .directory import MARKER, check_new_run, check_resumable, claim, clear_outputs, remove_torn_writes
from .divergence import Diverged
from .evaluate import evaluator, primary_metric, training_loss
from .hardware import DeviceLoss, autocast, grad_scaler, resolve_device
from .lock import locked_for_all_processes
from .outputs import fail, finish
from .settings import (
    CHECKPOINT_FILE,
    MARKER_FILE,
    PREVIOUS_CHECKPOINT_FILE,
    RUN_FILE,
    RunError,
    RunSettings,
)
from .setup import Setup, prepare
from .stop import StopRequests
from .threads import choose_threads
from .words import plural

RUN_FORMAT_VERSION = 1  # of run.json (and of the .adalora-run marker: directory.MARKER)


def run(
    settings: RunSettings,
    output_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """Train as ``settings`` say and write the outputs (module docstring); returns the metrics.

    Under ``torchrun`` or ``accelerate launch`` the processes train one model together (DDP over gloo: the run
    is on the CPU): ``--batch-size`` is the global micro-batch, split evenly over the processes, so the result is
    the single-process one up to float rounding (without dropout). Only rank 0 writes files, logs and the
    progress bar; the other processes return an empty dict.

    Args:
        settings: the run's settings. When resuming, ``run.json`` in ``output_dir`` holds them and only
            ``settings.threads`` is read (when set: a resumed run may use another thread count).
        output_dir: where everything goes: a new or empty directory, or a run of ours.
        resume: continue the run in ``output_dir`` from its checkpoint.
        overwrite: start over in a directory that already holds a run of ours (only its files are removed).
        progress: show a progress bar (on stderr).
        log: where one-line progress messages go.

    Raises:
        RunError, DataError: on anything the user can fix (message in one line), before anything is written.
        RunInUse: if another process is using ``output_dir`` (lock.py).
        Stopped: on SIGINT, SIGTERM or SIGHUP, after a checkpoint when training had started (stop.py).
        WriteError: if the system refuses a write (a full disk): the files written before stay as they were.
        Diverged: (a RunError) if the loss became NaN or inf; ``run.json`` then records the run as failed and no
            adapter is written.
    """
    # A launcher's environment starts the process group here, unless the caller already has one.
    owns_group = not parallel.is_distributed() and parallel.init_from_env("gloo")
    try:
        if not parallel.is_main_process():  # one process reports for all
            progress, log = False, _silent
        output_dir = Path(output_dir)
        command, fix = ("train --resume", "") if resume else ("train", ", or choose another --output-dir")
        # The lock comes first: checking the directory and claiming it are one step for any other process.
        with StopRequests() as stop, locked_for_all_processes(output_dir, command, fix=fix, create=not resume):
            settings = check_start(settings, output_dir, resume=resume, overwrite=overwrite, log=log)
            setup = load(settings, log)
            state = start_or_resume(setup, output_dir, resume=resume, overwrite=overwrite, log=log)
            try:
                seconds = train(setup, output_dir, state, progress=progress, log=log, stop=stop)
            except Diverged as failure:
                fail(output_dir, failure.record)
                raise
            metrics = finish(setup, output_dir, state, seconds)
        if metrics:
            report(setup, metrics, output_dir, log)
        return metrics
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()


def _silent(*args: Any, **kwargs: Any) -> None:
    return None


def check_start(settings: RunSettings, output_dir: Path, *, resume: bool, overwrite: bool, log: Any) -> RunSettings:
    """Every check that needs no model, before anything is written; returns the settings to run with (those
    saved in the directory when resuming, with the thread count decided)."""
    if resume:
        check_resumable(output_dir)
        saved = read_run_file(output_dir)
        if "failure" in saved:
            raise RunError(f"cannot resume {output_dir}: it failed: {saved['failure'].get('message')}")
        threads = settings.threads
        try:
            settings = RunSettings.from_dict(saved["settings"])
        except (ValueError, KeyError, TypeError) as error:
            raise RunError(f"--resume {output_dir}: {RUN_FILE} cannot be read ({error})") from None
        if threads is not None:  # the one setting a resumed run may change (docs/cli.md)
            settings = settings.replace(threads=threads)
    else:
        check_new_run(output_dir, overwrite)
    settings.check()
    world = parallel.get_world_size()
    if settings.batch_size % world:
        raise RunError(
            f"--batch-size {settings.batch_size} (the global micro-batch) does not split evenly over {world} "
            f"processes; use a multiple of {world}"
        )
    if settings.tensorboard:
        summary_writer_class()
    try:
        device = resolve_device(settings.device)  # decided once and saved, like the thread count
    except RunError as error:
        if not resume:
            raise
        raise RunError(f"cannot resume {output_dir} here: it trains on {settings.device} ({error})") from None
    if world > 1 and device != "cpu":
        raise RunError(
            f"--device {settings.device}: runs of several processes train on the CPU (DDP over gloo); "
            "use --device cpu, or one process"
        )
    settings = settings.replace(device=device)
    if settings.threads is None:  # decided once and saved in run.json: a resumed run computes the same way
        choice = choose_threads()
        settings = settings.replace(threads=choice.threads)
        log(f"using {plural(choice.threads, 'torch thread')}: {choice.reason}")
    parallel.barrier()  # every process has checked the directory before rank 0 writes into it
    return settings


def read_run_file(output_dir: Path) -> dict[str, Any]:
    """``run.json`` of a run of ours, refused in one line when it, or the ``.adalora-run`` marker, is missing,
    damaged or of another format version than this adalora writes."""
    files = {}
    for name, expected in ((MARKER_FILE, MARKER["format_version"]), (RUN_FILE, RUN_FORMAT_VERSION)):
        path = output_dir / name
        try:
            files[name] = read_json(path) if path.is_file() else {}
        except (OSError, ValueError) as error:
            raise RunError(f"{path} cannot be read ({error}); the run directory is damaged") from None
        version = files[name].get("format_version") if isinstance(files[name], dict) else None
        if version != expected:
            found = "no format_version (an older adalora's)" if version is None else f"format_version {version!r}"
            raise RunError(
                f"cannot resume {output_dir}: its {name} has {found}, this adalora reads version {expected} only; "
                "start the run over with --overwrite"
            )
    return files[RUN_FILE]


def load(settings: RunSettings, log: Any) -> Setup:
    """Data, model and method (:func:`prepare`), announced in one line."""
    causal = settings.task == causal_lm.CAUSAL_LM
    packaged = "the packaged SmolLM2-135M" if causal else "the packaged all-MiniLM-L6-v2"
    data = settings.train_file or ("the built-in text" if causal else settings.task)
    log(f"loading {settings.model or packaged} and {data}")
    return prepare(settings)


def start_or_resume(setup: Setup, output_dir: Path, *, resume: bool, overwrite: bool, log: Any) -> dict[str, Any]:
    """Mark the directory as ours and record the run (a new run), or restore the checkpoint (``resume``).

    Returns the run's state (:func:`new_state`, or the checkpoint's).
    """
    state = new_state()
    if resume:
        run_file = read_json(output_dir / RUN_FILE)
        saved = run_file["derived"]
        # Keys a newer version derives that the run's own run.json lacks are not changes.
        changed = sorted(k for k in saved if saved.get(k) != setup.derived.get(k))
        if changed:
            raise RunError(f"cannot resume {output_dir}: the data or model changed since it started ({changed})")
        state = resume_state(setup, output_dir, run_file["run_id"], log)
    if parallel.is_main_process():
        if overwrite and not resume:
            clear_outputs(output_dir)
        claim(output_dir)
        if not resume:  # a new id: the checkpoints of this run are told from any other's by it
            run_file = {"format_version": RUN_FORMAT_VERSION, "run_id": uuid.uuid4().hex}
            write_json(
                output_dir / RUN_FILE, run_file | {"settings": setup.settings.to_dict(), "derived": setup.derived}
            )
        remove_torn_writes(output_dir)
    return state


def resume_state(setup: Setup, output_dir: Path, run_id: str, log: Any) -> dict[str, Any]:
    """Restore the newest usable checkpoint of the run into ``setup``; returns the run's state from it (a new
    state when the run stopped before its first checkpoint).

    Raises:
        RunError: in one line, if the checkpoints are damaged, belong to another run or do not fit the model.
    """
    newest, previous = output_dir / CHECKPOINT_FILE, output_dir / PREVIOUS_CHECKPOINT_FILE
    if not newest.is_file() and not previous.is_file():
        log(f"no checkpoint in {output_dir} yet: starting again from step 0")
        return new_state()
    objects = {"model": setup.model, "optimizer": setup.optimizer, "scheduler": setup.scheduler}
    try:
        state, used, passed = load_latest_checkpoint(newest, **objects, allocator=setup.allocator, run_id=run_id)
    except CheckpointError as error:
        raise RunError(
            f"cannot resume {output_dir}: {error}; start the run over with --overwrite (its settings are in "
            f"{output_dir / RUN_FILE})"
        ) from None
    for reason in passed:
        log(f"{reason}: resuming from the checkpoint before it, {used.name}")
    log(f"resuming {output_dir} at step {state['step']}/{setup.total_steps}")
    return state


def describe(setup: Setup, log: Any) -> None:
    """One line: method, task, data sizes, steps, examples per step, trainable parameters, threads."""
    settings, derived, world = setup.settings, setup.derived, parallel.get_world_size()
    # causal-lm packs text into rows of --max-length tokens: the rows are what batches count
    rows = f" ({derived['train_rows']} / {derived['eval_rows']} rows)" if "train_rows" in derived else ""
    per_step = settings.batch_size * settings.grad_accum
    accumulated = f" ({settings.grad_accum} x {settings.batch_size})" if settings.grad_accum > 1 else ""
    processes = f" x {plural(world, 'process', 'processes')}" if world > 1 else ""
    if setup.device != "cpu" or settings.precision != "fp32" or settings.gradient_checkpointing:
        checkpointing = ", gradient checkpointing" if settings.gradient_checkpointing else ""
        processes += f", on {setup.device} in {settings.precision}{checkpointing}"
    log(
        f"{settings.method} on {derived['task']}: {derived['train_examples']} train / {derived['eval_examples']} eval "
        f"examples{rows}, {plural(setup.total_steps, 'step')} of {per_step}{accumulated} examples, "
        f"{derived['trainable_parameters']:,} trainable parameters, "
        f"{plural(torch.get_num_threads(), 'thread')}{processes}"
    )
    if world > 1 and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in setup.model.modules()):
        log(
            "dropout is on: each process draws its own dropout masks, so this run equals a one-process run "
            "statistically, not number for number (docs/scaling-out.md)"
        )


def train(
    setup: Setup,
    output_dir: Path,
    state: dict[str, Any],
    *,
    progress: bool,
    log: Any,
    stop: StopRequests | None = None,
) -> float:
    """Train from ``state`` to the last step (updating ``state``); returns the training seconds in all.

    With ``stop``, a signal stops the run at the next step boundary, after a checkpoint (stop.py)."""
    settings = setup.settings
    rank, world = parallel.get_rank(), parallel.get_world_size()
    describe(setup, log)
    if settings.task == causal_lm.CAUSAL_LM and "eval_before" not in state:
        with autocast(setup.device, settings.precision):
            state["eval_before"] = evaluator(settings.task)(setup.model, setup.eval, settings.eval_batch_size)
        log(f"held-out perplexity before training {state['eval_before']['perplexity']:.2f}")
    scaler = grad_scaler(setup.device, settings.precision)
    callbacks = RunCallbacks(setup, output_dir, state, progress, scaler)
    stop = stop or StopRequests()

    def stop_if_asked() -> None:
        stop.check(state["step"], setup.total_steps, callbacks.saved_step, callbacks.checkpoint)

    def on_step(result: FitStepReport) -> None:
        callbacks.on_step(result)
        if result.step % callbacks.per_epoch:  # the last step of an epoch stops after its evaluation
            stop_if_asked()

    def on_epoch_end(epoch: int, step: int) -> None:
        callbacks.on_epoch_end(epoch, step)
        stop_if_asked()

    # closing: the progress bar ends its line before any message of a stop or an error
    with warnings.catch_warnings(), stop.at_step_boundaries(), contextlib.closing(callbacks):
        warnings.simplefilter("always", RuntimeWarning)  # misuse warnings from the allocator: never swallowed
        # ... but one line each among the run's, without Python's file name and source line
        warnings.showwarning = lambda message, *_, **__: callbacks.warn(str(message))
        fit(
            # DDP averages the gradients of the processes' shares of every batch (allocator: same masks everywhere)
            torch.nn.parallel.DistributedDataParallel(setup.model) if world > 1 else setup.model,
            lambda epoch: TensorBatches(setup.train, settings.batch_size, settings.seed, epoch, rank, world),
            setup.optimizer,
            setup.allocator,
            epochs=settings.epochs,
            accumulation_steps=settings.grad_accum,
            scheduler=setup.scheduler,
            max_grad_norm=settings.max_grad_norm,
            start_step=state["step"],
            loss_fn=DeviceLoss(setup.device, settings.precision, training_loss(settings.task)),
            on_step=on_step,
            on_epoch_end=on_epoch_end,
            grad_scaler=scaler,
        )
        callbacks.check_finite()
        stop_if_asked()  # a signal that came after the last step's check
    return callbacks.seconds()


def report(setup: Setup, metrics: dict[str, Any], output_dir: Path, log: Any) -> None:
    """The last line of a run: the final score (and the one before training, for causal-lm), time, where."""
    metric = primary_metric(setup.settings.task)
    before = metrics.get(f"eval_{metric}_before")
    before_text = "" if before is None else f" (before training {before:.2f})"
    log(
        f"eval {metric} {metrics[f'eval_{metric}']:.4f}{before_text} after {plural(setup.settings.epochs, 'epoch')} "
        f"({metrics['train_seconds']:.0f} s); outputs in {output_dir}"
    )
