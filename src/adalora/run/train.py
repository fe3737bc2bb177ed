"""One fine-tuning run from settings to output directory: what ``adalora train`` does.

    check (nothing written) -> load data, model, method (setup.py) -> start or resume in the output directory
    -> train with :func:`adalora.integrations.loop.fit` (callbacks.py: progress, evaluation, checkpoints)
    -> finish (outputs.py: adapter, metrics, rank pattern, allocation history, figures).

The output directory holds ``.adalora-run`` (the marker that makes it a run of ours: directory.py), ``run.json``
(the settings and the values derived from them), ``checkpoint.pt`` while the run is in progress (atomic; removed
when it completes), and at the end ``metrics.json``, ``rank_pattern.json``, ``allocation_history.json``,
``rank_heatmap.png``, ``budget_curve.png`` and the trained weights (``adapter/`` for the adapter methods,
``model/`` for full fine-tuning).

Everything that can be refused (settings out of range, a directory that is not ours, an unwritable location,
a missing optional package, bad data, a model that does not load) is checked before the first file is written.

Resuming (``resume=True``) rebuilds everything from ``run.json``, restores the checkpoint (trainable weights,
optimizer, LR scheduler, allocator, RNG states) and continues mid-epoch with the same data order, so a killed
run ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from .. import parallel
from ..files.atomic import read_json, write_json
from ..files.checkpoint import load_checkpoint
from ..integrations.loop import fit
from . import causal_lm
from .batches import TensorBatches
from .callbacks import RunCallbacks, new_state, summary_writer_class
from .directory import check_new_run, check_resumable, claim, clear_outputs, remove_torn_checkpoints
from .evaluate import evaluator, primary_metric, training_loss
from .hardware import DeviceLoss, autocast, grad_scaler, resolve_device
from .outputs import finish
from .settings import (
    CHECKPOINT_FILE,
    RUN_FILE,
    RunError,
    RunSettings,
)
from .setup import Setup, prepare
from .threads import choose_threads
from .words import plural


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
        settings: the run's settings (ignored when resuming: ``run.json`` in ``output_dir`` is used).
        output_dir: where everything goes: a new or empty directory, or a run of ours.
        resume: continue the run in ``output_dir`` from its checkpoint.
        overwrite: start over in a directory that already holds a run of ours (only its files are removed).
        progress: show a progress bar (on stderr).
        log: where one-line progress messages go.

    Raises:
        RunError, DataError: on anything the user can fix (message in one line), before anything is written.
    """
    # A launcher's environment starts the process group here, unless the caller already has one.
    owns_group = not parallel.is_distributed() and parallel.init_from_env("gloo")
    try:
        if not parallel.is_main_process():  # one process reports for all
            progress, log = False, _silent
        output_dir = Path(output_dir)
        settings = check_start(settings, output_dir, resume=resume, overwrite=overwrite, log=log)
        setup = load(settings, log)
        state = start_or_resume(setup, output_dir, resume=resume, overwrite=overwrite, log=log)
        seconds = train(setup, output_dir, state, progress=progress, log=log)
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
        try:
            settings = RunSettings.from_dict(read_json(output_dir / RUN_FILE)["settings"])
        except (ValueError, KeyError, TypeError) as error:
            raise RunError(f"--resume {output_dir}: {RUN_FILE} cannot be read ({error})") from None
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
    if resume:
        saved = read_json(output_dir / RUN_FILE)["derived"]
        # Keys a newer version derives that the run's own run.json lacks are not changes.
        changed = sorted(k for k in saved if saved.get(k) != setup.derived.get(k))
        if changed:
            raise RunError(f"cannot resume {output_dir}: the data or model changed since it started ({changed})")
    if parallel.is_main_process():
        if overwrite and not resume:
            clear_outputs(output_dir)
        claim(output_dir)
        if not resume:
            write_json(output_dir / RUN_FILE, {"settings": setup.settings.to_dict(), "derived": setup.derived})
        remove_torn_checkpoints(output_dir)
    state = new_state()
    checkpoint = output_dir / CHECKPOINT_FILE
    if resume and checkpoint.is_file():
        objects = {"model": setup.model, "optimizer": setup.optimizer, "scheduler": setup.scheduler}
        state = load_checkpoint(checkpoint, **objects, allocator=setup.allocator)
        log(f"resuming {output_dir} at step {state['step']}/{setup.total_steps}")
    elif resume:
        log(f"no checkpoint in {output_dir} yet: starting again from step 0")
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


def train(setup: Setup, output_dir: Path, state: dict[str, Any], *, progress: bool, log: Any) -> float:
    """Train from ``state`` to the last step (updating ``state``); returns the training seconds in all."""
    settings = setup.settings
    rank, world = parallel.get_rank(), parallel.get_world_size()
    describe(setup, log)
    if settings.task == causal_lm.CAUSAL_LM and "eval_before" not in state:
        with autocast(setup.device, settings.precision):
            state["eval_before"] = evaluator(settings.task)(setup.model, setup.eval, settings.eval_batch_size)
        log(f"held-out perplexity before training {state['eval_before']['perplexity']:.2f}")
    scaler = grad_scaler(setup.device, settings.precision)
    callbacks = RunCallbacks(setup, output_dir, state, progress, scaler)
    with warnings.catch_warnings():
        warnings.simplefilter("always", RuntimeWarning)  # misuse warnings from the allocator: never swallowed
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
            on_step=callbacks.on_step,
            on_epoch_end=callbacks.on_epoch_end,
            grad_scaler=scaler,
        )
    callbacks.close()
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
