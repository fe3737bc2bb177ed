"""What happens around the training loop of a run: the progress bar, TensorBoard scalars, the per-epoch
evaluation, the checkpoints and the divergence check. :class:`RunCallbacks` holds the run's state (step,
per-epoch records, budgets, elapsed time: what a checkpoint saves besides the weights) and gives
:func:`adalora.integrations.loop.fit` its ``on_step`` and ``on_epoch_end``."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from .. import parallel
from ..files.atomic import read_json
from ..files.checkpoint import save_checkpoint, trainable_state_dict
from ..finite import non_finite
from ..integrations.loop import FitStepReport
from .collapse import guard_epoch
from .defaults import training_rank
from .divergence import Diverged, diverged, track
from .evaluate import evaluator, primary_metric
from .hardware import autocast
from .settings import CHECKPOINT_FILE, RUN_FILE, RunError
from .setup import Setup


def new_state() -> dict[str, Any]:
    """The state of a run that has not trained yet (what :class:`RunCallbacks` updates and checkpoints save)."""
    return {
        "step": 0, "epochs": [], "budgets": [], "seconds": 0.0, "loss_sum": 0.0, "loss_n": 0, "nonfinite_since": None,
    }  # fmt: skip


def summary_writer_class() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``; :class:`RunError` if the tensorboard package is missing
    (checked before a run writes anything)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RunError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


class RunCallbacks:
    """Progress bar, TensorBoard, evaluation after each epoch and checkpoints, for one run of :func:`fit`.

    Args:
        setup: the run's model, data, optimizer, scheduler and allocator.
        output_dir: where checkpoints and TensorBoard logs go.
        state: :func:`new_state`, or the state restored from a checkpoint.
        progress: show the progress bar (on stderr).
    """

    def __init__(
        self,
        setup: Setup,
        output_dir: Path,
        state: dict[str, Any],
        progress: bool,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        from tqdm.auto import tqdm

        self.setup, self.settings, self.state, self.scaler = setup, setup.settings, state, scaler
        if scaler is not None and "grad_scaler" in state:  # fp16: the loss scale reached before the restart
            scaler.load_state_dict(state["grad_scaler"])
        self.main = parallel.is_main_process()
        self.checkpoint_path = output_dir / CHECKPOINT_FILE
        self.run_id = read_json(output_dir / RUN_FILE)["run_id"] if self.main else None  # what checkpoints belong to
        self.metric = primary_metric(self.settings.task)
        self.evaluate = evaluator(self.settings.task)
        self.per_epoch = setup.total_steps // self.settings.epochs
        self.writer = None
        if self.settings.tensorboard and self.main:
            writer_class = summary_writer_class()
            self.writer = writer_class(log_dir=str(output_dir / "tensorboard"), purge_step=state["step"] or None)
        self.started, self.seconds_before = time.perf_counter(), state["seconds"]
        self.saved_step: int | None = None  # the step of the last checkpoint this process wrote
        self.guard = collapse_guard_inputs(setup) if self.metric == "accuracy" else None
        self.bar = tqdm(
            total=setup.total_steps, initial=state["step"], desc=self.settings.method, unit="step", disable=not progress
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
        setup = self.setup
        save_checkpoint(
            self.checkpoint_path,
            model=setup.model,
            optimizer=setup.optimizer,
            scheduler=setup.scheduler,
            allocator=setup.allocator,
            extra=self.state,
            run_id=self.run_id,
        )

    def diverged(self) -> Diverged:
        """The error that stops a diverged run (:mod:`adalora.run.divergence`)."""
        setup = self.setup
        lr = setup.optimizer.defaults["lr"]
        return diverged(self.state, self.state["step"], setup.total_steps, lr, self.settings.precision)

    def check_finite(self) -> None:
        """After the last step: raise :class:`Diverged` if the last loss or the trained weights are not finite
        (a run that diverged too close to its end for :func:`on_step` to stop it)."""
        if self.state["nonfinite_since"] is not None or non_finite(trainable_state_dict(self.setup.model).items()):
            raise self.diverged()

    def warn(self, message: str) -> None:
        """A warning, as one line among the run's (rank 0 only)."""
        if self.main:
            self.bar.write(f"warning: {' '.join(message.split())}")

    def on_step(self, result: FitStepReport) -> None:
        """After every optimizer step: loss (averaged over the processes' shares of the batch), bar, logs."""
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
        # Epoch ends checkpoint after their evaluation (on_epoch_end), so skip them here.
        if result.step % self.settings.save_every == 0 and result.step % self.per_epoch != 0:
            self.checkpoint()

    def on_epoch_end(self, epoch: int, step: int) -> None:
        """Evaluate (the bar says so meanwhile), record the epoch, print one line, checkpoint."""
        if not self.bar.disable:  # a disabled bar has no description to change
            self.bar.set_description_str(f"{self.settings.method} (evaluating)", refresh=True)
        with autocast(self.setup.device, self.settings.precision):
            scores = self.evaluate(self.setup.model, self.setup.eval, self.settings.eval_batch_size)
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
                f"epoch {epoch + 1}/{self.settings.epochs}: eval {self.metric} {scores[self.metric]:.4f}, eval loss "
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

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def collapse_guard_inputs(setup: Setup) -> tuple[list[int], list[int], float, float | None]:
    """(train label counts, eval label counts, lr, adapter scale) for :func:`adalora.run.collapse.guard_epoch`."""
    settings = setup.settings
    labels = len(setup.task.label_names)
    train = torch.bincount(setup.train["labels"], minlength=labels).tolist()
    held_out = torch.bincount(setup.eval["labels"], minlength=labels).tolist()
    config = settings.adalora
    rank = training_rank(settings.method, settings.lora_r, config.target_r, config.init_r)
    return train, held_out, setup.optimizer.defaults["lr"], config.alpha / rank if rank else None
