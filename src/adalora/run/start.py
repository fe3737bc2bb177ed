"""Where a run starts in its output directory: a new run marks the directory as ours and records itself in
``run.json`` (a new run id, the settings and what the run derived from them); a resumed one checks that its data
and model are those it started with and restores its newest usable checkpoint. Either way it returns the run's
state: the step, the per-epoch records and what else a checkpoint carries besides the weights.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import parallel
from ..files.atomic import read_json, write_json
from ..files.checkpoint import CheckpointError, load_latest_checkpoint
from .directory import (
    CHECKPOINT_FILE,
    PREVIOUS_CHECKPOINT_FILE,
    RUN_FILE,
    RUN_FORMAT_VERSION,
    claim,
    clear_outputs,
    remove_torn_writes,
)
from .method import Method
from .model import Model
from .names import run_name
from .settings import CAUSAL_LM, RunError, RunSettings
from .tasks import Data


def new_state() -> dict[str, Any]:
    """The state of a run that has not trained yet (what the loop updates and checkpoints save)."""
    return {
        "step": 0, "epochs": [], "budgets": [], "seconds": 0.0, "loss_sum": 0.0, "loss_n": 0, "nonfinite_since": None,
    }  # fmt: skip


def derived_values(settings: RunSettings, data: Data, model: Model, method: Method) -> dict[str, Any]:
    """What ``run.json`` records beside the settings: what the run derived from them and from its data and model
    (compared on ``--resume``: a run continues only on the data and model it started with)."""
    task, config = data.task, method.config
    derived: dict[str, Any] = {
        "name": run_name(settings),
        "model_path": str(model.path),
        "task": task.name,
        "label_names": list(task.label_names),
        "train_examples": len(task.train),
        "eval_examples": len(task.eval),
        "total_steps": method.total_steps,
        "modules_to_save": list(model.heads),
        "examples_per_step": settings.batch_size * settings.grad_accum,  # --batch-size is the micro-batch
        "lr": method.lr,
        "trainable_parameters": method.trainable_parameters,
    }
    if settings.task == CAUSAL_LM:  # packed text: the rows are what batches count
        derived.update(train_rows=data.rows, eval_rows=len(data.eval["labels"]))
    if settings.quantize != "none":
        derived["quantized_layers"] = model.quantized_layers
    if config is not None:
        targets = config.target_modules
        derived["target_modules"] = targets if isinstance(targets, str) else list(targets)
    if method.allocator is not None:
        derived.update(warmup_steps=config.warmup_steps, final_steps=config.final_steps)  # type: ignore[union-attr]
        derived.update(init_budget=method.allocator.init_budget, target_budget=method.allocator.target_budget)
    return derived


def start(
    output_dir: Path,
    settings: RunSettings,
    derived: dict[str, Any],
    model: Model,
    method: Method,
    *,
    resume: bool,
    overwrite: bool,
    log: Callable[[str], Any],
) -> dict[str, Any]:
    """Mark the directory as ours and record the run (a new run), or restore the checkpoint (``resume``).

    Returns the run's state (:func:`new_state`, or the checkpoint's).

    Raises:
        RunError: when resuming, if the data or model changed or no checkpoint of the run can be used.
    """
    state = new_state()
    if resume:
        run_file = read_json(output_dir / RUN_FILE)
        saved = run_file["derived"]
        # Keys a newer version derives that the run's own run.json lacks are not changes.
        changed = sorted(k for k in saved if saved.get(k) != derived.get(k))
        if changed:
            raise RunError(f"cannot resume {output_dir}: the data or model changed since it started ({changed})")
        state = restore(output_dir, run_file["run_id"], model, method, log)
    if parallel.is_main_process():
        if overwrite and not resume:
            clear_outputs(output_dir)
        claim(output_dir)
        if not resume:  # a new id: the checkpoints of this run are told from any other's by it
            run_file = {"format_version": RUN_FORMAT_VERSION, "run_id": uuid.uuid4().hex}
            write_json(output_dir / RUN_FILE, run_file | {"settings": settings.to_dict(), "derived": derived})
        remove_torn_writes(output_dir)
    return state


def restore(output_dir: Path, run_id: str, model: Model, method: Method, log: Callable[[str], Any]) -> dict[str, Any]:
    """Restore the newest usable checkpoint of the run into the model and the method; returns the run's state from
    it (a new state when the run stopped before its first checkpoint).

    Raises:
        RunError: in one line, if the checkpoints are damaged, belong to another run or do not fit the model.
    """
    newest, previous = output_dir / CHECKPOINT_FILE, output_dir / PREVIOUS_CHECKPOINT_FILE
    if not newest.is_file() and not previous.is_file():
        log(f"no checkpoint in {output_dir} yet: starting again from step 0")
        return new_state()
    objects = {"model": model.module, "optimizer": method.optimizer, "scheduler": method.scheduler}
    try:
        state, used, passed = load_latest_checkpoint(newest, **objects, allocator=method.allocator, run_id=run_id)
    except CheckpointError as error:
        raise RunError(
            f"cannot resume {output_dir}: {error}; start the run over with --overwrite (its settings are in "
            f"{output_dir / RUN_FILE})"
        ) from None
    for reason in passed:
        log(f"{reason}: resuming from the checkpoint before it, {used.name}")
    log(f"resuming {output_dir} at step {state['step']}/{method.total_steps}")
    return state
