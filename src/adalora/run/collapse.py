"""Has a classification run collapsed to a constant prediction?

A run whose learning rate is too high for its adapter scale can fall into predicting one class for every
input: its training loss then sits at the loss of the best *constant* prediction, which is the entropy of
the training label distribution,

    H = -sum_c p_c ln p_c,    p_c = n_c / sum(n)         (nats; ln 2 = 0.693 for two balanced classes),

and its eval accuracy at most at the majority-class rate of the eval labels, max_c m_c / sum(m) (a constant
prediction scores the rate of whichever class it predicts, so the minority rate counts too: "no better than
the majority rate").

A run is called collapsed at an epoch when BOTH hold at that epoch's end:

- the epoch's mean training loss is at least ``(1 - loss_tolerance) * H`` (flat at, or above, the constant
  prediction's loss), and
- its eval accuracy is at most the majority rate plus ``accuracy_tolerance``.

Either signal alone misfires: a run that learns slowly (a low learning rate) keeps its training loss near H
for an epoch while its accuracy already rises, and on an imbalanced task a run can sit at the majority rate
after one epoch while its loss is already falling below H. Together they flagged exactly the runs at chance
in the project's earlier measurements (docs/cli.md, *Defaults that do not collapse*).

The warning names the likely cause (:func:`likely_cause`): a learning rate too high, or a run too short.

Pure logic, no torch: the run calls :func:`guard_epoch` after every epoch (``adalora.run.loop``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .words import plural

LOSS_TOLERANCE = 0.02  # relative: a learning run's epoch-mean loss drops well below H by its final epoch
ACCURACY_TOLERANCE = 0.01  # absolute: one point above the majority rate is still "a constant prediction"
# Telling the causes apart (likely_cause). A collapse from too high a rate can sit at H (a constant prediction of
# the class frequencies) or above it; a run that has not yet learned sits at H, not above: so a loss above 1.1 H
# is an overshoot. The default learning rates were measured on runs of 124 to 250 steps, none of which collapsed
# (docs/cli.md, *Defaults that do not collapse*): a run of fewer than 100 steps is shorter than any of them.
OVERSHOOT = 1.1
SHORT_RUN_STEPS = 100


@dataclass(frozen=True)
class Collapse:
    """Evidence that a run predicts one class.

    Attributes:
        train_loss: the epoch's mean training loss (nats).
        constant_loss: H, the entropy of the training labels (the best constant prediction's loss).
        eval_accuracy: the epoch's eval accuracy.
        majority_rate: share of the most frequent class among the eval labels.
    """

    train_loss: float
    constant_loss: float
    eval_accuracy: float
    majority_rate: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _check_counts(counts: Sequence[int], what: str) -> list[int]:
    values = [int(c) for c in counts]
    if not values or any(c < 0 for c in values) or sum(values) == 0:
        raise ValueError(f"{what}: need non-negative counts per class with a positive total, got {list(counts)}")
    return values


def constant_prediction_loss(train_label_counts: Sequence[int]) -> float:
    """Entropy H (nats) of the label distribution ``train_label_counts`` (one count per class): the
    cross-entropy of the best constant prediction, which predicts the training class frequencies."""
    counts = _check_counts(train_label_counts, "train_label_counts")
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts if c > 0)


def majority_rate(eval_label_counts: Sequence[int]) -> float:
    """Share of the most frequent class among ``eval_label_counts`` (one count per class)."""
    counts = _check_counts(eval_label_counts, "eval_label_counts")
    return max(counts) / sum(counts)


def detect_collapse(
    train_loss: float,
    eval_accuracy: float,
    train_label_counts: Sequence[int],
    eval_label_counts: Sequence[int],
    *,
    loss_tolerance: float = LOSS_TOLERANCE,
    accuracy_tolerance: float = ACCURACY_TOLERANCE,
) -> Collapse | None:
    """The evidence of a collapse at one epoch's end (module docstring), or None if the run is learning.

    Args:
        train_loss: mean training cross-entropy over the epoch (nats, without any regulariser).
        eval_accuracy: eval accuracy at the epoch's end, in [0, 1].
        train_label_counts: number of training examples of each class.
        eval_label_counts: number of eval examples of each class.
        loss_tolerance: relative margin below H still counted as "at the constant-prediction loss".
        accuracy_tolerance: absolute margin above the majority rate still counted as "a constant prediction".
    """
    if not 0.0 <= eval_accuracy <= 1.0:
        raise ValueError(f"eval_accuracy must be in [0, 1], got {eval_accuracy}")
    constant = constant_prediction_loss(train_label_counts)
    majority = majority_rate(eval_label_counts)
    # NaN/inf losses (a diverged run) count as flat-or-above: float comparisons with NaN are False, so test it.
    loss_flat = not math.isfinite(train_loss) or train_loss >= (1.0 - loss_tolerance) * constant
    if loss_flat and eval_accuracy <= majority + accuracy_tolerance:
        return Collapse(float(train_loss), constant, float(eval_accuracy), majority)
    return None


def likely_cause(collapse: Collapse, total_steps: int, lr: float, scale: float | None) -> str:
    """The cause the warning names, and what to try, told apart by what was seen:

    - a loss above the constant prediction's (more than :data:`OVERSHOOT` x H, or not finite): the updates
      overshoot, so the learning rate is too high, however long the run;
    - a loss at H in a run of fewer than :data:`SHORT_RUN_STEPS` optimizer steps: the run is too short for its
      schedule (LR warm-up, then decay to 0) to leave the constant prediction, whatever the rate;
    - a loss at H in a longer run: a rate too high for the adapter scale (the usual case), or too low.
    """
    scale_text = f" and adapter scale alpha/r = {scale:g}" if scale is not None else ""
    if not math.isfinite(collapse.train_loss) or collapse.train_loss > OVERSHOOT * collapse.constant_loss:
        return (
            f"Likely cause: learning rate {lr:g} too high for this model{scale_text}: the loss rose above the "
            "constant prediction's. Try a learning rate 2-3x lower (--lr), or another --seed."
        )
    if total_steps < SHORT_RUN_STEPS:
        return (
            f"Likely cause: too few steps: the run has {plural(total_steps, 'optimizer step')} in all, too few for "
            f"its schedule (LR warm-up, then decay to 0) to move off the constant prediction at learning rate "
            f"{lr:g}. Train longer (more --epochs or data, or a smaller --batch-size); if a run of "
            f"{SHORT_RUN_STEPS} steps or more still collapses, lower --lr."
        )
    return (
        f"Likely cause: learning rate {lr:g} too high for this model{scale_text}. Try a learning rate 2-3x lower "
        "(--lr), or another --seed; if you lowered --lr yourself, the run may instead be learning too slowly "
        "(train longer or raise it)."
    )


def collapse_message(
    collapse: Collapse, epoch: int, epochs: int, lr: float, scale: float | None, total_steps: int
) -> str:
    """The one warning a run logs: what was seen, the likely cause (:func:`likely_cause`), and what to try."""
    c = collapse
    return (
        f"warning: the run looks collapsed after epoch {epoch} of {epochs}: train loss {c.train_loss:.4f} is at "
        f"or above the loss of always predicting the training class frequencies ({c.constant_loss:.4f}) and "
        f"eval accuracy {c.eval_accuracy:.4f} is no better than the majority-class rate ({c.majority_rate:.4f}). "
        + likely_cause(collapse, total_steps, lr, scale)
    )


def collapse_record(collapse: Collapse, epoch: int, final: bool, message: str) -> dict[str, Any]:
    """What ``metrics.json`` keeps under ``"collapse"``."""
    return {"epoch": epoch, "final_epoch": final, **collapse.to_dict(), "message": message}


def guard_epoch(
    state: dict[str, Any],
    epoch: int,
    epochs: int,
    train_loss: float,
    eval_accuracy: float,
    train_label_counts: Sequence[int],
    eval_label_counts: Sequence[int],
    lr: float,
    scale: float | None,
    total_steps: int,
) -> str | None:
    """Check one finished epoch of a run of ``total_steps`` optimizer steps and update its checkpointed ``state``;
    returns the warning to log.

    ``state["collapse"]`` becomes the record of this epoch when it looks collapsed, else None (after the last
    epoch it is what ``metrics.json`` reports); ``state["collapse_epochs"]`` lists every flagged epoch (1-based).
    The warning is returned only for the first flagged epoch of the run: one warning, not one per epoch.
    """
    found = detect_collapse(train_loss, eval_accuracy, train_label_counts, eval_label_counts)
    if found is None:
        state["collapse"] = None
        return None
    message = collapse_message(found, epoch, epochs, lr, scale, total_steps)
    state["collapse"] = collapse_record(found, epoch, epoch == epochs, message)
    flagged = state.setdefault("collapse_epochs", [])
    flagged.append(epoch)
    return message if len(flagged) == 1 else None
