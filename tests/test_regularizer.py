import math

import pytest
import torch
from torch import nn

from adalora.layers import SVDLinear
from adalora.regularizer import regularization


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
        assert regularization([adapter], form).item() == pytest.approx(0.0, abs=1e-5)


def test_hand_computed_values():
    # P = [[2, 0], [0, 1]]: P^T P - I = diag(3, 0); Q = [[1, 1]] (r = 1): Q Q^T - I = [[1]].
    a = _adapter([[2.0], [0.0]], [[1.0, 1.0]])  # r = 1: P^T P = 4 -> 3, Q Q^T = 2 -> 1
    b = _adapter([[1.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [0.0, 1.0]])  # P^T P - I = diag(0, 3); Q Q^T - I = 0
    # paper (eq. 4): sum of squared Frobenius norms = 3^2 + 1^2 + 3^2 + 0 = 19
    assert regularization([a, b], "paper").item() == pytest.approx(19.0)
    # reference: mean of the 4 unsquared norms = (3 + 1 + 3 + 0) / 4
    assert regularization([a, b], "reference").item() == pytest.approx(7 / 4)


def test_gradient_pushes_towards_orthonormality():
    adapter = _adapter(torch.randn(6, 3), torch.randn(3, 5))
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.01)
    first = regularization([adapter], "paper").item()
    for _ in range(200):
        optimizer.zero_grad()
        regularization([adapter], "paper").backward()
        optimizer.step()
    assert regularization([adapter], "paper").item() < 0.01 * first
    assert adapter.E.grad is None or torch.all(adapter.E.grad == 0)


def test_reference_form_matches_a_direct_computation():
    adapters = [_adapter(torch.randn(6, 3), torch.randn(3, 5)), _adapter(torch.randn(4, 2), torch.randn(2, 7))]
    norms = []
    for a in adapters:
        norms.append(torch.linalg.matrix_norm(a.P.T @ a.P - torch.eye(a.r)))
        norms.append(torch.linalg.matrix_norm(a.Q @ a.Q.T - torch.eye(a.r)))
    expected = sum(norms) / len(norms)
    assert regularization(adapters, "reference").item() == pytest.approx(expected.item(), rel=1e-6)
    assert math.isfinite(regularization([], "reference").item())


# ---------------------------------------------------------------- closed-form gradient (add_regularization_gradient)


def _adapters(shapes, dtype, seed=0):
    """Adapters with random P (d_out, r), Q (r, d_in) of the given (d_out, r, d_in) shapes, in ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for d_out, r, d_in in shapes:
        a = SVDLinear.from_base(nn.Linear(d_in, d_out), r=r, scale=1.0).to(dtype)
        with torch.no_grad():
            a.P.copy_(torch.randn(d_out, r, generator=generator, dtype=dtype))
            a.Q.copy_(torch.randn(r, d_in, generator=generator, dtype=dtype))
        out.append(a)
    return out


def _autograd_gradients(adapters, weight, form):
    for a in adapters:
        a.zero_grad(set_to_none=True)
    value = weight * regularization(adapters, form)
    value.backward()
    grads = [(a.P.grad.clone(), a.Q.grad.clone()) for a in adapters]
    for a in adapters:
        a.zero_grad(set_to_none=True)
    return value.detach(), grads


# Mixed shapes: two groups of equal shapes (3 and 2 members), a lone adapter, and one whose P shares a shape with
# the first group's but whose Q does not (factors are grouped by their own shape), so grouping and order matter.
MIXED = [(6, 3, 5), (4, 2, 7), (6, 3, 5), (4, 2, 7), (6, 3, 5), (9, 4, 3), (6, 3, 8)]


@pytest.mark.parametrize("form", ["reference", "paper"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_closed_form_gradient_equals_autograd(form, dtype, tol):
    from adalora.regularizer import add_regularization_gradient

    adapters = _adapters(MIXED, dtype)
    expected_value, expected = _autograd_gradients(adapters, 0.3, form)
    value = add_regularization_gradient(adapters, 0.3, form)
    torch.testing.assert_close(value, expected_value, rtol=tol, atol=tol)
    for a, (gp, gq) in zip(adapters, expected, strict=True):
        torch.testing.assert_close(a.P.grad, gp, rtol=tol, atol=tol)
        torch.testing.assert_close(a.Q.grad, gq, rtol=tol, atol=tol)
        assert a.E.grad is None  # R does not depend on lambda


def test_closed_form_gradient_matches_a_hand_computation():
    from adalora.regularizer import add_regularization_gradient

    # P = [[2], [0]] (r = 1): D_P = [[3]]; Q = [[1, 1]]: D_Q = [[1]]. Paper: dR/dP = 4 P D_P = [[24], [0]],
    # dR/dQ = 4 D_Q Q = [[4, 4]]. Reference (n = 1): P D_P / ||D_P|| = [[2], [0]], D_Q Q / ||D_Q|| = [[1, 1]].
    a = _adapter([[2.0], [0.0]], [[1.0, 1.0]])
    add_regularization_gradient([a], 1.0, "paper")
    assert a.P.grad.tolist() == [[24.0], [0.0]] and a.Q.grad.tolist() == [[4.0, 4.0]]
    a.zero_grad(set_to_none=True)
    add_regularization_gradient([a], 1.0, "reference")
    assert a.P.grad.tolist() == [[2.0], [0.0]] and a.Q.grad.tolist() == [[1.0, 1.0]]


@pytest.mark.parametrize("form", ["reference", "paper"])
def test_closed_form_gradient_adds_to_an_existing_gradient(form):
    from adalora.regularizer import add_regularization_gradient

    adapters = _adapters(MIXED, torch.float64)
    _, expected = _autograd_gradients(adapters, 0.5, form)
    existing = [(torch.randn_like(a.P), torch.randn_like(a.Q)) for a in adapters]
    for a, (gp, gq) in zip(adapters, existing, strict=True):
        a.P.grad, a.Q.grad = gp.clone(), gq.clone()
    # Half the adapters with a gradient, half without (a factor that got none in the backward pass).
    for a in adapters[::2]:
        a.P.grad = None
    add_regularization_gradient(adapters, 0.5, form)
    for i, (a, (gp, gq), (ep, eq)) in enumerate(zip(adapters, expected, existing, strict=True)):
        torch.testing.assert_close(a.P.grad, gp if i % 2 == 0 else gp + ep, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.Q.grad, gq + eq, rtol=1e-12, atol=1e-12)
    # Set-from-None gradients own their storage (not views into one stacked tensor).
    assert adapters[0].P.grad.untyped_storage().data_ptr() != adapters[2].P.grad.untyped_storage().data_ptr()


@pytest.mark.parametrize("form", ["reference", "paper"])
def test_closed_form_gradient_at_zero_deviation_and_rank_zero(form):
    from adalora.regularizer import add_regularization_gradient

    orthonormal = _adapters([(6, 3, 5)], torch.float64)[0]
    with torch.no_grad():
        orthonormal.P.copy_(torch.eye(6, 3, dtype=torch.float64))  # P^T P - I = 0 exactly
    empty = _adapters([(6, 0, 5)], torch.float64)[0]  # rank 0: a compacted-away adapter
    others = _adapters([(6, 3, 5), (4, 2, 7)], torch.float64, seed=1)
    adapters = [orthonormal, empty, *others]
    expected_value, expected = _autograd_gradients(adapters, 1.0, form)
    value = add_regularization_gradient(adapters, 1.0, form)
    torch.testing.assert_close(value, expected_value)
    assert torch.all(orthonormal.P.grad == 0)  # the unsquared norm's gradient at D = 0 is taken as 0
    assert empty.P.grad.shape == (6, 0) and empty.Q.grad.shape == (0, 5)
    for a, (gp, gq) in zip(adapters, expected, strict=True):
        assert torch.isfinite(a.P.grad).all() and torch.isfinite(a.Q.grad).all()
        torch.testing.assert_close(a.P.grad, gp)
        torch.testing.assert_close(a.Q.grad, gq)


def test_closed_form_gradient_refuses_an_unknown_form():
    from adalora.regularizer import add_regularization_gradient

    with pytest.raises(ValueError, match="unknown form"):
        add_regularization_gradient(_adapters([(4, 2, 3)], torch.float32), 1.0, "squared")
