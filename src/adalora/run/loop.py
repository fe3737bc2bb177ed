"""The training stage of a run: :func:`adalora.integrations.loop.fit` from the run's state to its last step, with
what happens around it: the progress bar, TensorBoard scalars, the per-epoch evaluation, the checkpoints, the
divergence and collapse checks, and stopping on a signal at a step boundary (stop.py). :class:`RunCallbacks` holds
the run's state (step, per-epoch records, budgets, elapsed time: what a checkpoint saves besides the weights)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import parallel
from ..files.atomic import read_json
from ..files.checkpoint import save_checkpoint, trainable_state_dict
from ..finite import non_finite
from ..integrations.loop import FitStepReport, fit
from .batches import TensorBatches
from .collapse import guard_epoch
from .defaults import training_rank
from .directory import CHECKPOINT_FILE, RUN_FILE
from .divergence import Diverged, diverged, track
from .hardware import DeviceLoss, autocast, grad_scaler
from .method import Method
from .model import Model
from .names import run_name
from .settings import CAUSAL_LM, RunError, RunSettings
from .stop import StopRequests
from .tasks import Data, Kind, kind_of
from .words import plural


def summary_writer_class() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``; :class:`RunError` if the tensorboard package is missing
    (checked before a run writes anything)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RunError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def train(
    settings: RunSettings,
    data: Data,
    model: Model,
    method: Method,
    output_dir: Path,
    state: dict[str, Any],
    *,
    progress: bool,
    log: Callable[[str], Any],
    stop: StopRequests | None = None,
) -> float:
    """Train from ``state`` to the last step (updating ``state``); returns the training seconds in all.

    With ``stop``, a signal stops the run at the next step boundary, after a checkpoint (stop.py)."""
    kind, rank, world = kind_of(settings.task), parallel.get_rank(), parallel.get_world_size()
    for line in describe(settings, data, model, method):
        log(line)
    loss = DeviceLoss(model.device, settings.precision, kind.loss)
    scaler = grad_scaler(model.device, settings.precision)
    if kind.score_before and "eval_before" not in state:
        with autocast(model.device, settings.precision):
            state["eval_before"] = kind.evaluate(model.module, data.eval, settings.eval_batch_size)
        log(f"held-out {kind.metric} before training {state['eval_before'][kind.metric]:.2f}")
    batches = functools.partial(TensorBatches, data.train, settings.batch_size, settings.seed, rank=rank, world=world)
    callbacks = RunCallbacks(settings, data, model, method, kind, output_dir, state, progress, scaler, stop)
    # closing: the progress bar ends its line before any message of a stop or an error
    with warnings.catch_warnings(), callbacks.stop.at_step_boundaries(), contextlib.closing(callbacks):
        callbacks.show_warnings()
        fit(
            # DDP averages the gradients of the processes' shares of every batch (allocator: same masks everywhere)
            torch.nn.parallel.DistributedDataParallel(model.module) if world > 1 else model.module,
            batches,
            method.optimizer,
            method.allocator,
            epochs=settings.epochs,
            accumulation_steps=settings.grad_accum,
            scheduler=method.scheduler,
            max_grad_norm=settings.max_grad_norm,
            start_step=state["step"],
            loss_fn=loss,
            on_step=callbacks.on_step,
            on_epoch_end=callbacks.on_epoch_end,
            grad_scaler=scaler,
        )
        callbacks.check_finite()
        callbacks.stop_if_asked()  # a signal that came after the last step's check
    return callbacks.seconds()


def describe(settings: RunSettings, data: Data, model: Model, method: Method) -> list[str]:
    """What the run is, in one line (its name: model, task and method; data sizes, steps, examples per step,
    trainable parameters, threads), and under several processes with dropout a second: such a run equals a
    one-process run only statistically."""
    task, world = data.task, parallel.get_world_size()
    # causal-lm packs text into rows of --max-length tokens: the rows are what batches count
    rows = f" ({data.rows} / {len(data.eval['labels'])} rows)" if settings.task == CAUSAL_LM else ""
    per_step = settings.batch_size * settings.grad_accum
    accumulated = f" ({settings.grad_accum} x {settings.batch_size})" if settings.grad_accum > 1 else ""
    processes = f" x {plural(world, 'process', 'processes')}" if world > 1 else ""
    if model.device != "cpu" or settings.precision != "fp32" or settings.gradient_checkpointing:
        checkpointing = ", gradient checkpointing" if settings.gradient_checkpointing else ""
        processes += f", on {model.device} in {settings.precision}{checkpointing}"
    lines = [
        f"{run_name(settings)}: {len(task.train)} train / {len(task.eval)} eval "
        f"examples{rows}, {plural(method.total_steps, 'step')} of {per_step}{accumulated} examples, "
        f"{method.trainable_parameters:,} trainable parameters, "
        f"{plural(torch.get_num_threads(), 'thread')}{processes}"
    ]
    if world > 1 and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.module.modules()):
        lines.append(
            "dropout is on: each process draws its own dropout masks, so this run equals a one-process run "
            "statistically, not number for number (docs/scaling-out.md)"
        )
    return lines


class RunCallbacks:
    """Progress bar, TensorBoard, evaluation after each epoch and checkpoints, for one run of :func:`fit`.

    Args:
        settings, data, model, method: the run's stages' products.
        kind: the kind of its task (how it evaluates, which metric it reports).
        output_dir: where checkpoints and TensorBoard logs go.
        state: :func:`adalora.run.start.new_state`, or the state restored from a checkpoint.
        progress: show the progress bar (on stderr).
        scaler: fp16's loss scaler, whose scale checkpoints carry.
        stop: the signal handlers of the run (stop.py); a signal stops it at the next step boundary.
    """

    def __init__(
        self,
        settings: RunSettings,
        data: Data,
        model: Model,
        method: Method,
        kind: Kind,
        output_dir: Path,
        state: dict[str, Any],
        progress: bool,
        scaler: torch.amp.GradScaler | None = None,
        stop: StopRequests | None = None,
    ) -> None:
        self.settings, self.data, self.model, self.method, self.kind = settings, data, model, method, kind
        self.state, self.scaler, self.stop = state, scaler, stop or StopRequests()
        if scaler is not None and "grad_scaler" in state:  # fp16: the loss scale reached before the restart
            scaler.load_state_dict(state["grad_scaler"])
        self.main = parallel.is_main_process()
        self.checkpoint_path = output_dir / CHECKPOINT_FILE
        self.run_id = read_json(output_dir / RUN_FILE)["run_id"] if self.main else None  # what checkpoints belong to
        self.per_epoch = method.total_steps // settings.epochs
        self.writer = None
        if self.settings.tensorboard and self.main:
            writer_class = summary_writer_class()
            self.writer = writer_class(log_dir=str(output_dir / "tensorboard"), purge_step=state["step"] or None)
        self.started, self.seconds_before = time.perf_counter(), state["seconds"]
        self.saved_step: int | None = None  # the step of the last checkpoint this process wrote
        self.guard = self.collapse_guard_inputs() if kind.metric == "accuracy" else None
        self.bar = tqdm(
            total=method.total_steps, initial=state["step"], desc=settings.method, unit="step", disable=not progress
        )

    def seconds(self) -> float:
        """Training time so far, across resumptions."""
        return self.seconds_before + time.perf_counter() - self.started

    def checkpoint(self) -> None:
        """Save weights, optimizer, scheduler, allocator, RNG states and the run's state (rank 0 only: every
        process holds the same state under DDP)."""
        self.state["seconds"] = self.seconds()
        self.saved_step = self.state["step"]
        if self.scaler is not None:
            self.state["grad_scaler"] = self.scaler.state_dict()
        if not self.main:
            return
        method = self.method
        save_checkpoint(
            self.checkpoint_path,
            model=self.model.module,
            optimizer=method.optimizer,
            scheduler=method.scheduler,
            allocator=method.allocator,
            extra=self.state,
            run_id=self.run_id,
        )

    def diverged(self) -> Diverged:
        """The error that stops a diverged run (:mod:`adalora.run.divergence`)."""
        step, total = self.state["step"], self.method.total_steps
        return diverged(self.state, step, total, self.method.lr, self.settings.precision)

    def check_finite(self) -> None:
        """After the last step: raise :class:`Diverged` if the last loss or the trained weights are not finite
        (a run that diverged too close to its end for :func:`on_step` to stop it)."""
        if self.state["nonfinite_since"] is not None or non_finite(trainable_state_dict(self.model.module).items()):
            raise self.diverged()

    def show_warnings(self) -> None:
        """Within ``warnings.catch_warnings()``: every warning (the allocator's misuse warnings too, never swallowed)
        as one line among the run's, without Python's file name and source line (rank 0 only)."""
        warnings.simplefilter("always", RuntimeWarning)

        def show(message: Warning | str, *args: Any, **kwargs: Any) -> None:
            if self.main:
                self.bar.write(f"warning: {' '.join(str(message).split())}")

        warnings.showwarning = show

    def stop_if_asked(self) -> None:
        """Stop the run here if a signal asked for it (stop.py), with a checkpoint of this step."""
        self.stop.check(self.state["step"], self.method.total_steps, self.saved_step, self.checkpoint)

    def on_step(self, result: FitStepReport) -> None:
        """After every optimizer step: loss (averaged over the processes' shares of the batch), bar, logs, checkpoint,
        and a stop if a signal asked for one."""
        state = self.state
        state["step"] = result.step
        result = dataclasses.replace(result, loss=parallel.mean_over_processes(result.loss))
        state["loss_sum"] += result.loss
        state["loss_n"] += 1
        if track(state, result.step, result.loss):
            raise self.diverged()
        postfix = {"loss": f"{result.loss:.3f}", "lr": f"{result.learning_rate:.1e}"}
        if result.report is not None:
            state["budgets"].append(result.report.budget)
            postfix["budget"] = result.report.budget
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", result.loss, result.step)
            self.writer.add_scalar("train/lr", result.learning_rate, result.step)
            if result.report is not None:
                self.writer.add_scalar("adalora/budget", result.report.budget, result.step)
                self.writer.add_scalar("adalora/regularization", result.regularization, result.step)
        # Epoch ends checkpoint after their evaluation (on_epoch_end), so skip them here; they stop there too.
        if result.step % self.per_epoch != 0:
            if result.step % self.settings.save_every == 0:
                self.checkpoint()
            self.stop_if_asked()

    def on_epoch_end(self, epoch: int, step: int) -> None:
        """Evaluate (the bar says so meanwhile), record the epoch, print one line, checkpoint; stop if asked."""
        metric = self.kind.metric
        if not self.bar.disable:  # a disabled bar has no description to change
            self.bar.set_description_str(f"{self.settings.method} (evaluating)", refresh=True)
        with autocast(self.model.device, self.settings.precision):
            scores = self.kind.evaluate(self.model.module, self.data.eval, self.settings.eval_batch_size)
        if not self.bar.disable:
            self.bar.set_description_str(self.settings.method, refresh=False)
        state = self.state
        record = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": state["loss_sum"] / max(1, state["loss_n"]),
            **{f"eval_{key}": value for key, value in scores.items()},
            "seconds": round(self.seconds(), 1),
        }
        state["epochs"].append(record)
        state["loss_sum"], state["loss_n"] = 0.0, 0
        if self.main:  # tqdm.write prints even when the bar is disabled
            self.bar.write(
                f"epoch {epoch + 1}/{self.settings.epochs}: eval {metric} {scores[metric]:.4f}, eval loss "
                f"{scores['loss']:.4f}, train loss {record['train_loss']:.4f} [{record['seconds']:.0f} s]"
            )
        if self.guard is not None:  # one warning when the run collapsed to a constant prediction
            found = (state, epoch + 1, self.settings.epochs, record["train_loss"], scores["accuracy"], *self.guard)
            if (warning := guard_epoch(*found)) and self.main:
                self.bar.write(warning)
        if self.writer is not None:
            for key, value in scores.items():
                self.writer.add_scalar(f"eval/{key}", value, step)
        self.checkpoint()
        self.stop_if_asked()

    def collapse_guard_inputs(self) -> tuple[list[int], list[int], float, float | None, int]:
        """(train label counts, eval label counts, lr, adapter scale, total steps) for
        :func:`adalora.run.collapse.guard_epoch`."""
        settings, config = self.settings, self.settings.adalora
        labels = len(self.data.task.label_names)
        train = torch.bincount(self.data.train["labels"], minlength=labels).tolist()
        held_out = torch.bincount(self.data.eval["labels"], minlength=labels).tolist()
        rank = training_rank(settings.method, settings.lora_r, config.target_r, config.init_r)
        return train, held_out, self.method.lr, config.alpha / rank if rank else None, self.method.total_steps

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
