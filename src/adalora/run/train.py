"""One fine-tuning run from settings to output directory: what ``adalora train`` does.

    settings -> check (check.py: nothing written yet) -> data (tasks.py: examples, then tensors) -> model
    (model.py) -> method (method.py) -> start or resume in the output directory (start.py) -> train (loop.py:
    :func:`adalora.integrations.loop.fit` with progress, evaluation, checkpoints) -> outputs (outputs.py: adapter,
    metrics, rank pattern, allocation history, figures).

Each stage is a module that takes the products of the stages before it and returns its own; this one only calls
them in order.

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

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch

from .. import parallel
from .check import check_run
from .divergence import Diverged
from .lock import locked_for_all_processes
from .loop import train
from .method import Method, apply_method
from .model import Model, load_model
from .outputs import fail, finish, summary
from .settings import RunSettings
from .start import derived_values, start
from .stop import StopRequests
from .tasks import Data, encode, read_task


def run(
    settings: RunSettings,
    output_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], Any] = print,
    given: Collection[str] = (),
) -> dict[str, Any]:
    """Train as ``settings`` say and write the outputs (module docstring); returns the metrics.

    Under ``torchrun`` or ``accelerate launch`` the processes train one model together (DDP over gloo, on the CPU):
    ``--batch-size`` is the global micro-batch, split evenly over the processes, so the result is the single-process
    one up to float rounding (without dropout). Only rank 0 writes files and logs; the others return ``{}``.

    Args:
        settings: the run's settings. When resuming, ``run.json`` in ``output_dir`` holds them: only
            ``settings.threads`` is read (when set: a resumed run may use another thread count), and the settings
            named in ``given`` must equal the saved ones.
        output_dir: where everything goes: a new or empty directory, or a run of ours.
        resume: continue the run in ``output_dir`` from its checkpoint.
        overwrite: start over in a directory that already holds a run of ours (only its files are removed).
        progress: show a progress bar (on stderr).
        log: where one-line progress messages go.
        given: with ``resume``, the settings the caller asks for explicitly (the flags typed with ``--resume``).

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
    if not parallel.is_main_process():  # one process reports for all
        progress, log = False, lambda *args, **kwargs: None
    output_dir = Path(output_dir)
    command, fix = ("train --resume", "") if resume else ("train", ", or choose another --output-dir")
    try:
        # The lock comes first: checking the directory and claiming it are one step for any other process.
        with StopRequests() as stop, locked_for_all_processes(output_dir, command, fix=fix, create=not resume):
            settings = check_run(settings, output_dir, resume=resume, overwrite=overwrite, given=given, log=log)
            data, model, method = prepare(settings, log)
            derived = derived_values(settings, data, model, method)
            state = start(output_dir, settings, derived, model, method, resume=resume, overwrite=overwrite, log=log)
            try:
                seconds = train(settings, data, model, method, output_dir, state, progress=progress, log=log, stop=stop)
            except Diverged as failure:
                fail(output_dir, failure.record)
                raise
            metrics = finish(settings, data.task, model, method, output_dir, state, seconds)
        if metrics:
            log(summary(settings, metrics, output_dir))
        return metrics
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()


def prepare(settings: RunSettings, log: Callable[[str], Any] = print) -> tuple[Data, Model, Method]:
    """Everything a run trains with, nothing trained and nothing written: the task's examples (first, so that a bad
    file is reported before a model loads), the model, the examples' tensors, the method applied to the model.

    ``settings`` are those the check stage returns (:func:`~adalora.run.check.check_run`), with a concrete device
    (``hardware.resolve_device``) rather than ``auto``."""
    task = read_task(settings, log)
    model = load_model(settings, task)
    data = encode(settings, task, model.tokenizer)
    return data, model, apply_method(settings, data, model)
