import math

import pytest
import torch
from torch import nn

from adalora.layers import SVDLinear
from adalora.regularizer import orthogonal_penalty


def _adapter(p, q):
    p, q = torch.as_tensor(p, dtype=torch.float32), torch.as_tensor(q, dtype=torch.float32)
    adapter = SVDLinear.from_base(nn.Linear(q.shape[1], p.shape[0]), r=p.shape[1], scale=1.0)
    with torch.no_grad():
        adapter.P.copy_(p)
        adapter.Q.copy_(q)
    return adapter


def test_orthonormal_factors_cost_nothing():
    p, _ = torch.linalg.qr(torch.randn(6, 3))  # orthonormal columns
    q, _ = torch.linalg.qr(torch.randn(5, 3))
    adapter = _adapter(p, q.T)  # orthonormal rows
    for form in ("reference", "paper"):
        assert orthogonal_penalty([adapter], form).item() == pytest.approx(0.0, abs=1e-5)


def test_hand_computed_values():
    # P = [[2, 0], [0, 1]]: P^T P - I = diag(3, 0); Q = [[1, 1]] (r = 1): Q Q^T - I = [[1]].
    a = _adapter([[2.0], [0.0]], [[1.0, 1.0]])  # r = 1: P^T P = 4 -> 3, Q Q^T = 2 -> 1
    b = _adapter([[1.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [0.0, 1.0]])  # P^T P - I = diag(0, 3); Q Q^T - I = 0
    # paper (eq. 4): sum of squared Frobenius norms = 3^2 + 1^2 + 3^2 + 0 = 19
    assert orthogonal_penalty([a, b], "paper").item() == pytest.approx(19.0)
    # reference: mean of the 4 unsquared norms = (3 + 1 + 3 + 0) / 4
    assert orthogonal_penalty([a, b], "reference").item() == pytest.approx(7 / 4)


def test_gradient_pushes_towards_orthonormality():
    adapter = _adapter(torch.randn(6, 3), torch.randn(3, 5))
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.01)
    first = orthogonal_penalty([adapter], "paper").item()
    for _ in range(200):
        optimizer.zero_grad()
        orthogonal_penalty([adapter], "paper").backward()
        optimizer.step()
    assert orthogonal_penalty([adapter], "paper").item() < 0.01 * first
    assert adapter.E.grad is None or torch.all(adapter.E.grad == 0)


def test_reference_form_matches_a_direct_computation():
    adapters = [_adapter(torch.randn(6, 3), torch.randn(3, 5)), _adapter(torch.randn(4, 2), torch.randn(2, 7))]
    norms = []
    for a in adapters:
        norms.append(torch.linalg.matrix_norm(a.P.T @ a.P - torch.eye(a.r)))
        norms.append(torch.linalg.matrix_norm(a.Q @ a.Q.T - torch.eye(a.r)))
    expected = sum(norms) / len(norms)
    assert orthogonal_penalty(adapters, "reference").item() == pytest.approx(expected.item(), rel=1e-6)
    assert math.isfinite(orthogonal_penalty([], "reference").item())
