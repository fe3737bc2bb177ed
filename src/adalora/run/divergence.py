"""When a run has diverged, and what it leaves: a loss that is NaN or inf for :data:`PATIENCE` optimizer steps in
a row stops the run with one line (:class:`Diverged`), and the run is recorded as failed, not completed.

Why three steps and not one: a single non-finite loss can be transient. Under ``--precision fp16`` a forward pass
may overflow on one batch; the GradScaler then skips that step (its gradients are not finite), the weights stay
as they were and the next loss is finite again. A step the GradScaler skips because the *gradients* overflowed
has a finite loss and does not count at all. In fp32, one non-finite loss already makes the weights NaN (a NaN
gradient gives a NaN update) and every later loss is NaN too, so a run that has really diverged reaches three
in a row two steps later: three tells a diverged run from a skipped step at the cost of two wasted steps.
"""

from __future__ import annotations

import math
from typing import Any

from .settings import RunError

PATIENCE = 3  # optimizer steps in a row with a non-finite loss that make a run diverged (module docstring)


class Diverged(RunError):
    """The run diverged; the message is one line, ``record`` what ``run.json`` keeps under ``"failure"``."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(record["message"])
        self.record = record


def track(state: dict[str, Any], step: int, loss: float) -> bool:
    """Note optimizer step ``step``'s loss in ``state["nonfinite_since"]`` (the first step of the current run
    of non-finite losses, or None); True when that run has reached :data:`PATIENCE` steps."""
    if math.isfinite(loss):
        state["nonfinite_since"] = None
        return False
    if state.get("nonfinite_since") is None:
        state["nonfinite_since"] = step
    return step - state["nonfinite_since"] + 1 >= PATIENCE


def diverged(state: dict[str, Any], step: int, total_steps: int, lr: float, precision: str) -> Diverged:
    """The :class:`Diverged` error of a run whose loss became non-finite at ``state["nonfinite_since"]`` (or
    whose weights are not finite at ``step``, when the loss never was).

    Args:
        lr: the peak learning rate (``--lr`` or its default), the first thing to lower.
        precision: ``--precision``: fp16 overflows are the other usual cause.
    """
    since = state.get("nonfinite_since") or step
    what = (
        f"the loss was NaN or inf for {step - since + 1} optimizer steps in a row from step {since} of {total_steps}"
        if state.get("nonfinite_since") is not None
        else f"the trained weights hold NaN or inf at optimizer step {step} of {total_steps}"
    )
    alternative = " or --precision bf16" if precision == "fp16" else ""
    message = (
        f"training diverged: {what}, at learning rate {lr:g}; the run is marked failed and no adapter was "
        f"written. Start it over with --overwrite and a lower --lr (e.g. {lr / 10:g}){alternative}"
    )
    return Diverged({"reason": "diverged", "step": since, "total_steps": total_steps, "lr": lr, "message": message})
