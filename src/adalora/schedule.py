"""The global budget schedule b(t) (paper Appendix A, eq. 14 in the authors' code form).

Pure functions of the step, like a learning-rate schedule: no state, no side effects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Phase = Literal["warmup", "budgeting", "final"]


@dataclass(frozen=True)
class BudgetDecision:
    """What the schedule asks for at one step.

    Attributes:
        budget: b(t), the number of singular values to keep over all adapted matrices.
        phase: ``"warmup"`` (t <= t_i), ``"budgeting"`` (t_i < t <= T - t_f) or ``"final"`` (t > T - t_f).
        allocate: whether to rank the triplets and mask down to ``budget`` at this step: every
            ``mask_interval`` steps in the budgeting phase, and always at t = T - t_f (the forced final
            allocation after which the pattern is frozen).
    """

    budget: int
    phase: Phase
    allocate: bool


def budget_at(
    step: int,
    *,
    init_budget: int,
    target_budget: int,
    warmup_steps: int,
    final_steps: int,
    total_steps: int,
    mask_interval: int,
) -> BudgetDecision:
    """b(t) with the cubic decrease of the reference code.

    ``b(t) = int(b(T) + (b(0) - b(T)) * (1 - (t - t_i) / (T - t_f - t_i))^3)`` for t_i < t <= T - t_f.
    (The paper's printed eq. 14 has an extra ``- t_f`` in the numerator; the authors' code, PEFT and this
    library use the form above, which reaches exactly b(T) at t = T - t_f.)

    Args:
        step: t, the 0-based index of the optimizer step just taken.
        init_budget: b(0), the sum of the initial ranks.
        target_budget: b(T), the final total rank.
        warmup_steps: t_i.
        final_steps: t_f.
        total_steps: T.
        mask_interval: DeltaT.
    """
    final_start = total_steps - final_steps
    if step <= warmup_steps:
        return BudgetDecision(init_budget, "warmup", allocate=False)
    if step > final_start:
        return BudgetDecision(target_budget, "final", allocate=False)
    remaining = 1.0 - (step - warmup_steps) / (final_start - warmup_steps)
    budget = int(target_budget + (init_budget - target_budget) * remaining**3)
    return BudgetDecision(budget, "budgeting", allocate=step % mask_interval == 0 or step == final_start)


def budget_curve(steps: int, **schedule: int) -> list[int]:
    """b(t) for t = 0 .. steps - 1 (for plots and tests); ``schedule`` holds :func:`budget_at`'s keyword arguments."""
    return [budget_at(t, **schedule).budget for t in range(steps)]
