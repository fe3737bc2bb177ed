import pytest
import torch
from torch import nn

from adalora.importance import ImportanceTracker
from adalora.layers import SVDLinear


def _adapters(shapes, r=3, seed=0):
    torch.manual_seed(seed)
    adapters = [SVDLinear.from_base(nn.Linear(d_in, d_out), r=r, scale=1.0) for d_out, d_in in shapes]
    for a in adapters:
        with torch.no_grad():
            a.E.normal_()
    return adapters


def _random_grads(tracker, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=generator) for p in tracker.parameters()]


def _naive_scores(adapters, grads_per_step, beta1, beta2):
    """Eq. 8-11 and 7 written element by element for one adapter at a time (independent of the flat layout)."""
    scores = []
    for a in adapters:
        per_param = {}
        for name in ("P", "E", "Q"):
            param = getattr(a, name)
            ibar = torch.zeros_like(param)
            ubar = torch.zeros_like(param)
            for grads in grads_per_step:
                sensitivity = (param * grads[id(param)]).abs()
                ibar = beta1 * ibar + (1 - beta1) * sensitivity
                ubar = beta2 * ubar + (1 - beta2) * (sensitivity - ibar).abs()
            per_param[name] = ibar * ubar
        s = per_param["E"] + per_param["P"].mean(dim=0) + per_param["Q"].mean(dim=1)
        scores.append(s)
    return torch.cat(scores)


def test_one_element_by_hand():
    """w = 2, grads -1 then 3, beta = 0.5: I = 2, 6; Ibar = 1, 3.5; Ubar = 0.5, 1.5; s = 5.25."""
    adapter = SVDLinear.from_base(nn.Linear(1, 1), r=1, scale=1.0)
    with torch.no_grad():
        adapter.P.fill_(0.0)
        adapter.Q.fill_(0.0)
        adapter.E.fill_(2.0)
    tracker = ImportanceTracker([adapter], "smoothed", beta1=0.5, beta2=0.5)
    for g in (-1.0, 3.0):
        tracker.update([torch.zeros(1, 1), torch.full((1,), g), torch.zeros(1, 1)])
    # I(1) = 2 -> Ibar = 1, Ubar = 0.5 * |2 - 1| = 0.5; I(2) = 6 -> Ibar = 3.5, Ubar = 0.25 + 0.5 * 2.5 = 1.5
    assert tracker.triplet_scores().item() == pytest.approx(3.5 * 1.5)


def test_triplet_score_eq7_by_hand():
    """S = s(lambda) + mean_j s(P_j,i) + mean_j s(Q_i,j), here with the plain sensitivity I = |w g|."""
    adapter = SVDLinear.from_base(nn.Linear(3, 2), r=2, scale=1.0)
    with torch.no_grad():
        adapter.P.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        adapter.E.copy_(torch.tensor([0.5, -1.0]))
        adapter.Q.copy_(torch.tensor([[1.0, 0.0, -1.0], [2.0, 2.0, 2.0]]))
    tracker = ImportanceTracker([adapter], "sensitivity", beta1=0.85, beta2=0.85)
    tracker.update([torch.ones(2, 2), torch.tensor([4.0, 1.0]), torch.ones(2, 3)])
    # triplet 0: |0.5*4| + mean(|1|, |3|) + mean(|1|, 0, |-1|) = 2 + 2 + 2/3
    # triplet 1: |-1*1| + mean(|2|, |4|) + mean(2, 2, 2)       = 1 + 3 + 2
    torch.testing.assert_close(tracker.triplet_scores(), torch.tensor([2 + 2 + 2 / 3, 6.0]))


@pytest.mark.parametrize("beta", [(0.85, 0.85), (0.5, 0.9)])
def test_flat_buffers_match_the_per_element_definition(beta):
    # Two shape groups, interleaved in model order, to exercise the layout and the reordering.
    adapters = _adapters([(4, 6), (5, 3), (4, 6), (5, 3), (7, 2)])
    tracker = ImportanceTracker(adapters, "smoothed", *beta)
    params = tracker.parameters()
    steps = []
    for seed in range(4):
        grads = _random_grads(tracker, seed)
        tracker.update(grads)
        steps.append({id(p): g for p, g in zip(params, grads, strict=True)})
    torch.testing.assert_close(tracker.triplet_scores(), _naive_scores(adapters, steps, *beta))


def test_magnitude_metric_is_abs_lambda_and_needs_no_statistics():
    adapters = _adapters([(4, 6), (5, 3)])
    tracker = ImportanceTracker(adapters, "magnitude", 0.85, 0.85)
    assert tracker.ibar is None and tracker.ubar is None
    torch.testing.assert_close(tracker.triplet_scores(), torch.cat([a.E.detach().abs() for a in adapters]))


def test_non_finite_gradients_leave_the_statistics_unchanged():
    adapters = _adapters([(4, 6), (5, 3)])
    tracker = ImportanceTracker(adapters, "smoothed", 0.85, 0.85)
    tracker.update(_random_grads(tracker, 0))
    ibar, ubar = tracker.ibar.clone(), tracker.ubar.clone()
    for bad in (float("nan"), float("inf")):
        grads = _random_grads(tracker, 1)
        grads[3][0] = bad
        tracker.update(grads)
        assert torch.equal(tracker.ibar, ibar) and torch.equal(tracker.ubar, ubar)
    assert int(tracker.skipped) == 2
    tracker.update(_random_grads(tracker, 2))
    assert not torch.equal(tracker.ibar, ibar)


def test_statistics_use_two_float32_buffers_of_the_adapter_size():
    adapters = _adapters([(4, 6), (5, 3)])
    tracker = ImportanceTracker(adapters, "smoothed", 0.85, 0.85)
    numel = sum(p.numel() for a in adapters for p in a.adapter_parameters())
    assert tracker.ibar.shape == tracker.ubar.shape == (numel,)
    assert tracker.ibar.dtype == torch.float32
    assert ImportanceTracker(adapters, "sensitivity", 0.85, 0.85).ubar is None


def test_bfloat16_adapters_get_a_float32_sensitivity():
    """I = |w g| of bf16 factors is the float32 product, not a product rounded to bf16 first."""
    adapter = SVDLinear.from_base(nn.Linear(1, 1), r=1, scale=1.0).to(torch.bfloat16)
    with torch.no_grad():
        adapter.P.zero_()
        adapter.Q.zero_()
        adapter.E.fill_(1.0078125)  # 1 + 2^-7, exact in bf16
    tracker = ImportanceTracker([adapter], "sensitivity", beta1=0.85, beta2=0.85)
    grads = [torch.zeros(1, 1, dtype=torch.bfloat16), torch.full((1,), 1.0078125, dtype=torch.bfloat16)]
    tracker.update([grads[0], grads[1], torch.zeros(1, 1, dtype=torch.bfloat16)])
    # (1 + 2^-7)^2 = 1 + 2^-6 + 2^-14: exact in float32; bf16 (8 significant bits) would round it to 1 + 2^-6.
    assert tracker.triplet_scores().item() == 1 + 2**-6 + 2**-14
