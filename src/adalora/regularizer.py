"""Orthogonality regulariser R(P, Q) that keeps P and Q close to orthonormal (paper eq. 4).

Two forms (docs/algorithm.md, the regulariser):

- ``"paper"``:     sum over adapters of ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2;
- ``"reference"``: mean over all 2n matrices of ||P^T P - I||_F and ||Q Q^T - I||_F (norm not squared),
                   as in the authors' code and PEFT. The default.

Two ways to apply it:

- :func:`orthogonal_penalty`: R as a differentiable tensor; the caller multiplies by gamma (``orth_reg_weight``)
  and adds it to whatever loss it has (one autograd graph through every adapter's Gram matrices);
- :func:`add_orthogonal_gradient`: gamma * dR/dP and gamma * dR/dQ in closed form, added straight into the
  factors' ``.grad`` (no graph, no loss): what the training integrations do just before the optimizer step.

Closed forms, with D_P = P^T P - I (r, r) and D_Q = Q Q^T - I (r, r), both symmetric, over n adapters:

- paper:     d||D_P||_F^2 / dP = 4 P D_P,            d||D_Q||_F^2 / dQ = 4 D_Q Q;
- reference: d(||D_P||_F / 2n) / dP = P D_P / (n ||D_P||_F),   likewise D_Q Q / (n ||D_Q||_F) for Q.

The unsquared norm has no derivative where D = 0 (an exactly orthonormal factor, or rank 0): there the gradient
is taken as 0, the minimum-norm subgradient and what autograd's ``matrix_norm`` backward returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .layers import SVDAdapter

if TYPE_CHECKING:
    from .config import RegularizerForm


def _groups(adapters: Sequence[SVDAdapter]) -> dict[tuple, list[SVDAdapter]]:
    """Adapters keyed by (P shape, Q shape, dtype, device): each group stacks into one batched matmul."""
    groups: dict[tuple, list[SVDAdapter]] = {}
    for a in adapters:
        groups.setdefault((a.P.shape, a.Q.shape, a.P.dtype, a.P.device), []).append(a)
    return groups


def gram_deviations(adapters: Sequence[SVDAdapter]) -> list[torch.Tensor]:
    """P^T P - I and Q Q^T - I for every adapter, batched by shape: a list of ``(g, r, r)`` stacks, differentiable.

    Adapters of equal shape are stacked so that a whole group costs one batched matmul forward and two backward
    (72 DeBERTa-sized adapters: 12 groups' worth of kernels instead of 216 small ones).
    """
    out = []
    for (p_shape, _, dtype, device), members in _groups(adapters).items():
        eye = torch.eye(p_shape[1], dtype=dtype, device=device)
        p = torch.stack([a.P for a in members])  # (g, d_out, r)
        q = torch.stack([a.Q for a in members])  # (g, r, d_in)
        out.append(p.mT @ p - eye)
        out.append(q @ q.mT - eye)
    return out


def orthogonal_penalty(adapters: Sequence[SVDAdapter], form: RegularizerForm = "reference") -> torch.Tensor:
    """R summed (paper) or averaged (reference) over ``adapters``; a 0-dim tensor with gradient.

    Returns zero (without gradient) when there are no adapters.
    """
    deviations = gram_deviations(adapters)
    if not deviations:
        return torch.zeros(())
    if form == "paper":
        return torch.stack([d.square().sum() for d in deviations]).sum()
    if form == "reference":
        return torch.cat([torch.linalg.matrix_norm(d) for d in deviations]).mean()
    raise ValueError(f"orthogonal_penalty: unknown form {form!r}; choose 'reference' or 'paper'")


@torch.no_grad()
def add_orthogonal_gradient(
    adapters: Sequence[SVDAdapter], weight: float, form: RegularizerForm = "reference"
) -> torch.Tensor:
    """Add ``weight * dR/dP`` and ``weight * dR/dQ`` into every adapter's ``P.grad`` and ``Q.grad``.

    Equals ``(weight * orthogonal_penalty(adapters, form)).backward()`` (tested against autograd in float64 and
    float32) without building a graph. Every factor is grouped with the factors of the same shape, P's and Q's
    separately (MiniLM's 36 adapters: 2 groups of P, 2 of Q): one stack and two batched matmuls per group; the
    (r, r) Gram deviations of every group are written into one buffer so that their norms and the reference
    form's 1/||D|| scaling take one operation each; one multi-tensor add puts it all into the gradients. A
    ``.grad`` that is None is set to the regulariser's gradient alone (as autograd would); lambda's gradient is
    untouched (R does not depend on it). Where a Gram deviation is exactly 0 the reference form's gradient is 0
    (see the module docstring).

    Args:
        adapters: the adapters R sums or averages over (for the reference form, all of them: the mean is over
            the 2n Gram matrices of this sequence).
        weight: gamma (``orth_reg_weight``).
        form: ``"reference"`` (mean of unsquared norms) or ``"paper"`` (sum of squared norms).

    Returns:
        ``weight * R`` as a detached 0-dim tensor on the adapters' device (for logging; reading it synchronises).
    """
    if form not in ("reference", "paper"):
        raise ValueError(f"add_orthogonal_gradient: unknown form {form!r}; choose 'reference' or 'paper'")
    if not adapters:
        return torch.zeros(())
    n = len(adapters)
    # Factors by (shape, dtype, device, is P): P (d_out, r) has Gram matrix P^T P, Q (r, d_in) has Q Q^T.
    groups: dict[tuple, list[torch.Tensor]] = {}
    for a in adapters:
        groups.setdefault((a.P.shape, a.P.dtype, a.P.device, True), []).append(a.P)
        groups.setdefault((a.Q.shape, a.Q.dtype, a.Q.device, False), []).append(a.Q)
    # Groups by the (r, r) buffer their deviations share: (r, dtype, device) -> [group key].
    buffers: dict[tuple, list[tuple]] = {}
    for key in groups:
        shape, dtype, device, is_p = key
        buffers.setdefault((shape[1] if is_p else shape[0], dtype, device), []).append(key)
    params: list[torch.Tensor] = []
    updates: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for (r, dtype, device), keys in buffers.items():
        eye = torch.eye(r, dtype=dtype, device=device)
        sizes = [len(groups[key]) for key in keys]
        deviations = torch.empty(sum(sizes), r, r, dtype=dtype, device=device)  # (G, r, r), all groups of this r
        stacks = []
        for key, deviation in zip(keys, deviations.split(sizes), strict=True):
            x = torch.stack(groups[key])  # (g, d_out, r) for P, (g, r, d_in) for Q
            a, b = (x.mT, x) if key[3] else (x, x.mT)
            torch.baddbmm(eye, a, b, beta=-1, out=deviation)  # P^T P - I or Q Q^T - I, symmetric
            stacks.append(x)
        norms = torch.linalg.matrix_norm(deviations)  # (G,)
        values.append(norms)
        if form == "paper":
            deviations *= 4.0 * weight
        else:
            # weight / (n ||D||), and 0 where ||D|| = 0 (the subgradient autograd takes): 1/0 = inf -> 0.
            coefficient = norms.reciprocal().nan_to_num_(posinf=0.0).mul_(weight / n)
            deviations *= coefficient[:, None, None]  # scale the small (r, r) factor, not the (d, r) product
        for key, x, deviation in zip(keys, stacks, deviations.split(sizes), strict=True):
            grad = torch.bmm(x, deviation) if key[3] else torch.bmm(deviation, x)  # P D or D Q
            params.extend(groups[key])
            updates.extend(grad.unbind(0))
    existing = [(p.grad, u) for p, u in zip(params, updates, strict=True) if p.grad is not None]
    if existing:
        grads, adds = zip(*existing, strict=True)
        torch._foreach_add_(list(grads), list(adds))
    for p, u in zip(params, updates, strict=True):
        if p.grad is None:
            p.grad = u.clone()
    norms = values[0] if len(values) == 1 else torch.cat(values)  # (2n,): every Gram deviation's norm
    if form == "paper":
        return norms.square().sum().mul_(weight)
    return norms.sum().mul_(weight / (2 * n))
