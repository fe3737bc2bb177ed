"""Where the budget curve draws each element: b(t), the allocations and the phase boundaries all at the 0-based
step t, so the forced final allocation at t = T - t_f sits on the boundary of the final phase, not inside it."""

from __future__ import annotations

import pytest

from adalora.run.plots import plot_budget_curve
from adalora.schedule import budget_at

SCHEDULE = {"init_budget": 48, "target_budget": 24, "warmup_steps": 2, "final_steps": 4, "total_steps": 12}


@pytest.fixture
def drawn(tmp_path, monkeypatch):
    """The figure of a 12-step schedule (t_i = 2, T - t_f = 8, an allocation every 2 steps), kept open to measure."""
    import matplotlib.pyplot as plt

    decisions = [budget_at(t, **SCHEDULE, mask_interval=2) for t in range(12)]
    budgets = [d.budget for d in decisions]
    allocations = [{"step": t, "ranks": [d.budget]} for t, d in enumerate(decisions) if d.allocate]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    phases = {"warmup_steps": 2, "final_start": 8}
    plot_budget_curve(budgets, tmp_path / "budget.png", allocations=allocations, phases=phases)
    (fig,) = figures
    yield fig.axes[0], budgets, allocations
    monkeypatch.undo()
    plt.close(fig)


def test_the_curve_the_allocations_and_the_boundaries_use_the_0_based_step(drawn) -> None:
    ax, budgets, allocations = drawn
    curve, *boundaries = ax.lines  # b(t), then the two axvlines
    assert list(curve.get_xdata()) == list(range(12)) and list(curve.get_ydata()) == budgets
    assert [list(line.get_xdata()) for line in boundaries] == [[2, 2], [8, 8]]
    (points,) = ax.collections
    xs, ys = points.get_offsets().T.tolist()
    assert xs == [4, 6, 8] == [a["step"] for a in allocations]  # DeltaT = 2 in (t_i, T - t_f], and T - t_f forced
    assert ys == [budgets[4], budgets[6], budgets[8]] and budgets[8] == 24  # each dot lies on the curve
    assert ax.get_xlim() == (0, 11)


def test_the_forced_allocation_is_the_last_point_of_the_budgeting_phase(drawn) -> None:
    ax, _, _ = drawn
    spans = {}
    for patch in ax.patches:  # axvspan: one rectangle per phase, in data x
        left = patch.get_x()
        spans[(left, left + patch.get_width())] = patch
    assert sorted(spans) == [(0, 2), (2, 8), (8, 11)]  # warm-up [0, t_i], decreasing [t_i, T - t_f], final
    forced = max(ax.collections[0].get_offsets()[:, 0])
    assert 2 < forced <= 8  # within the budgeting phase, on its right edge: not inside the final phase (8, 11]
