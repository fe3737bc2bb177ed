import itertools

import pytest

from adalora.schedule import budget_at, budget_curve

SCHEDULE = {
    "init_budget": 120,
    "target_budget": 40,
    "warmup_steps": 10,
    "final_steps": 20,
    "total_steps": 110,
    "mask_interval": 5,
}


def test_warmup_keeps_the_initial_budget_and_never_masks():
    for t in range(0, 11):
        decision = budget_at(t, **SCHEDULE)
        assert (decision.budget, decision.phase, decision.allocate) == (120, "warmup", False)


def test_hand_computed_cubic_values():
    # t_i = 10, T - t_f = 90, so the cubic runs over 80 steps: b = int(40 + 80 * (1 - (t - 10) / 80)^3)
    assert budget_at(11, **SCHEDULE).budget == int(40 + 80 * (79 / 80) ** 3) == 117
    assert budget_at(50, **SCHEDULE).budget == int(40 + 80 * 0.5**3) == 50
    assert budget_at(70, **SCHEDULE).budget == int(40 + 80 * 0.25**3) == 41
    assert budget_at(90, **SCHEDULE).budget == 40  # reaches b(T) exactly at T - t_f


def test_allocation_steps():
    flags = {t: budget_at(t, **SCHEDULE).allocate for t in range(110)}
    assert [t for t, f in flags.items() if f] == [15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90]
    # The forced final allocation happens at T - t_f even off the interval grid.
    odd = SCHEDULE | {"mask_interval": 7}
    assert budget_at(90, **odd).allocate and not budget_at(91, **odd).allocate


def test_final_phase_holds_the_target():
    for t in (91, 100, 109, 500):
        decision = budget_at(t, **SCHEDULE)
        assert (decision.budget, decision.phase, decision.allocate) == (40, "final", False)


def test_curve_is_monotone_and_hits_both_endpoints():
    curve = budget_curve(110, **SCHEDULE)
    assert curve[0] == 120 and curve[-1] == 40
    assert all(a >= b for a, b in itertools.pairwise(curve))


@pytest.mark.parametrize("t", [0, 10, 11, 89, 90, 91])
def test_phase_boundaries(t):
    phase = budget_at(t, **SCHEDULE).phase
    assert phase == ("warmup" if t <= 10 else "budgeting" if t <= 90 else "final")
