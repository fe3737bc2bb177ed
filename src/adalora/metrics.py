"""The element importance scores s(w) of eq. 7: the paper's (eq. 8-11) and its ablations (section 4.4), one table.

For every entry w of every adapter's P, lambda (E) and Q:

    I(w)    = |w * dL/dw|                                  sensitivity (eq. 8)
    Ibar(w) = b1 * Ibar(w) + (1 - b1) * I(w)               smoothed sensitivity (eq. 9)
    Ubar(w) = b2 * Ubar(w) + (1 - b2) * |I(w) - Ibar(w)|   uncertainty, with the updated Ibar (eq. 10)
    s(w)    = Ibar(w) * Ubar(w)                            (eq. 11)

:data:`METRICS` is the only list of scores: the config's validation, the importance tracker and the command line's
choices all read it, so a new score is one new entry. It depends on nothing else in the package, so that the config
can validate against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Fold = Callable[[list[torch.Tensor], torch.Tensor, "float | torch.Tensor", float, float], None]
ElementScores = Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ImportanceMetric:
    """One element score s(w) of eq. 7.

    Attributes:
        name: the value of ``AdaLoRAConfig.importance`` and ``--importance``.
        description: one line for the command line's help and the docs.
        statistics: float32 buffers it keeps, each the size of all adapter parameters together.
        fold: ``fold(statistics, I, keep, beta1, beta2)`` folds one step's sensitivity I into the statistics, in
            place; ``keep`` is 1 for a good step and 0 for a skipped one (which must leave them unchanged). I may
            be overwritten. None when the score needs no statistics.
        element_scores: ``element_scores(statistics, workspace)`` -> s for every element (may use ``workspace``).
            None for a score read from lambda alone.
    """

    name: str
    description: str
    statistics: int
    fold: Fold | None
    element_scores: ElementScores | None

    @property
    def needs_gradients(self) -> bool:
        return self.fold is not None

    @property
    def reads_lambda_only(self) -> bool:
        """S = |lambda|: meaningless when lambda is fixed (the LoRA baselines)."""
        return self.element_scores is None


def _fold_smoothed(stats: list[torch.Tensor], sensitivity: torch.Tensor, keep: Any, beta1: float, beta2: float) -> None:
    ibar, ubar = stats
    ibar.lerp_(sensitivity, keep * (1.0 - beta1))  # eq. 9
    deviation = sensitivity.sub_(ibar).abs_()  # |I - Ibar| with the updated Ibar (eq. 10)
    ubar.lerp_(deviation, keep * (1.0 - beta2))


def _fold_latest(stats: list[torch.Tensor], sensitivity: torch.Tensor, keep: Any, beta1: float, beta2: float) -> None:
    stats[0].lerp_(sensitivity, keep)  # lerp with weight 1 is an exact copy, with weight 0 a no-op


METRICS: dict[str, ImportanceMetric] = {
    m.name: m
    for m in (
        ImportanceMetric(
            "smoothed",
            "the paper's score: sensitivity |w dL/dw| smoothed by an EMA (beta1) times its uncertainty "
            "(EMA beta2), eq. 8-11",
            2,
            _fold_smoothed,
            lambda stats, workspace: torch.mul(stats[0], stats[1], out=workspace),
        ),
        ImportanceMetric(
            "sensitivity",
            "the sensitivity |w dL/dw| alone, eq. 8 (ablation of section 4.4)",
            1,
            _fold_latest,
            lambda stats, workspace: stats[0],
        ),
        ImportanceMetric(
            "magnitude", "the singular value |lambda| alone, no gradients (ablation of section 4.4)", 0, None, None
        ),
    )
}


def importance_metric(name: str) -> ImportanceMetric:
    """The :data:`METRICS` entry called ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in METRICS:
        raise ValueError(f"unknown importance metric {name!r}; choose one of {', '.join(METRICS)}")
    return METRICS[name]
