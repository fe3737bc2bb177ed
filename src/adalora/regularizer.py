"""Orthogonality regulariser R(P, Q) that keeps P and Q close to orthonormal (paper eq. 4).

Two forms (docs/algorithm.md, the regulariser):

- ``"paper"``:     sum over adapted matrices of ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2;
- ``"reference"``: mean over all 2n matrices of ||P^T P - I||_F and ||Q Q^T - I||_F (norm not squared),
                   as in the authors' code and PEFT. The default.

An adapter on the fused expert weight of an MoE block holds one P_e and Q_e per expert: each expert is one matrix of
the sum (and of the n in the mean), exactly as if its experts were separate layers.

Two ways to apply gamma * R (``orth_reg_weight``), each one function:

- :func:`regularization`: R as a differentiable tensor, for the caller to add gamma * R to its loss (one autograd
  graph through every adapter's Gram matrices);
- :func:`add_regularization_gradient`: gamma * dR/dP and gamma * dR/dQ in closed form, added straight into the
  factors' ``.grad`` (no graph, no loss). What every training integration does, once per optimizer step between
  the last backward pass and ``optimizer.step()``: adding gamma * R to a loss relies on how a trainer scales and
  fuses that loss (divided by the accumulation steps or not, normalised by a token count or not, replaced by a
  fused kernel); adding its gradient to the accumulated gradients does not.

The closed form reads the factors' values and adds to their gradients through the adapters'
:class:`~adalora.parallel.layout.Layout`: under DeepSpeed ZeRO those are its fp32 master copies and its gradient
buffers, not ``.grad``, which ZeRO never reads.

Factors sharded by FSDP2 are all-gathered (``full_tensor()``, differentiable: the backward pass hands each process
the gradient of its own rows), so R and its gradient are those of a single process; computing the Gram matrices on
the shards directly does not work (no sharding rule for the norm's backward). The gradient form then runs autograd
on R alone through the gather.

Closed forms, with D_P = P^T P - I (r, r) and D_Q = Q Q^T - I (r, r), both symmetric, over n adapters:

- paper:     d||D_P||_F^2 / dP = 4 P D_P,            d||D_Q||_F^2 / dQ = 4 D_Q Q;
- reference: d(||D_P||_F / 2n) / dP = P D_P / (n ||D_P||_F),   likewise D_Q Q / (n ||D_Q||_F) for Q.

The unsquared norm has no derivative where D = 0 (an exactly orthonormal factor, or rank 0): there the gradient
is taken as 0, the minimum-norm subgradient and what autograd's ``matrix_norm`` backward returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import torch

from .config import RegularizerForm
from .layers import SVDAdapter
from .parallel.layout import Layout
from .parallel.sharded import full_tensor, is_sharded

FORMS: tuple[RegularizerForm, ...] = get_args(RegularizerForm)


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"regularizer: unknown form {form!r}; choose 'reference' or 'paper'")


def gram_deviations(adapters: Sequence[SVDAdapter]) -> list[torch.Tensor]:
    """P^T P - I and Q Q^T - I for every matrix, batched by shape: a list of ``(g, r, r)`` stacks, differentiable.

    Adapters of equal shape are stacked so that a whole group costs one batched matmul forward and two backward,
    however many adapters it holds (a transformer has a handful of shapes and many adapters of each).
    """
    groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for a in adapters:
        p, q = full_tensor(a.P), full_tensor(a.Q)
        groups.setdefault((p.shape, q.shape, p.dtype, p.device), []).append((p, q))
    out = []
    for (p_shape, _, dtype, device), members in groups.items():
        eye = torch.eye(p_shape[-1], dtype=dtype, device=device)
        p = torch.stack([p for p, _ in members]).flatten(0, -3)  # (g, d_out, r), experts as matrices
        q = torch.stack([q for _, q in members]).flatten(0, -3)  # (g, r, d_in)
        out.append(p.mT @ p - eye)
        out.append(q @ q.mT - eye)
    return out


def regularization(adapters: Sequence[SVDAdapter], form: RegularizerForm = "reference") -> torch.Tensor:
    """R summed (paper) or averaged (reference) over ``adapters``; a 0-dim tensor with gradient.

    Returns zero (without gradient) when there are no adapters.
    """
    _check_form(form)
    deviations = gram_deviations(adapters)
    if not deviations:
        return torch.zeros(())
    if form == "paper":
        return torch.stack([d.square().sum() for d in deviations]).sum()
    return torch.cat([torch.linalg.matrix_norm(d) for d in deviations]).mean()


def add_regularization_gradient(
    adapters: Sequence[SVDAdapter], weight: float, form: RegularizerForm = "reference", layout: Layout | None = None
) -> torch.Tensor:
    """Add ``weight * dR/dP`` and ``weight * dR/dQ`` into every adapter's ``P.grad`` and ``Q.grad``.

    Equals ``(weight * regularization(adapters, form)).backward()`` (tested against autograd in float64 and
    float32), in closed form and without building a graph unless the factors are sharded. A ``.grad`` that is None
    is set to the regulariser's gradient alone (as autograd would); lambda's gradient is untouched (R does not
    depend on it). Where a Gram deviation is exactly 0 the reference form's gradient is 0 (see the module
    docstring).

    Args:
        adapters: the adapters R sums or averages over (for the reference form, all of them: the mean is over
            the 2n Gram matrices of this sequence).
        weight: gamma (``orth_reg_weight``).
        form: ``"reference"`` (mean of unsquared norms) or ``"paper"`` (sum of squared norms).
        layout: how the adapters lie over processes (the allocator's); default: one process holding them whole.

    Returns:
        ``weight * R`` as a detached 0-dim tensor on the adapters' device (for logging; reading it synchronises).
    """
    _check_form(form)
    if not adapters:
        return torch.zeros(())
    if any(is_sharded(a.P) for a in adapters):
        # Through the all-gather: the backward pass accumulates each process's rows of the gradient into its .grad.
        value = weight * regularization(adapters, form)
        value.backward()
        return value.detach()
    return _add_closed_form_gradient(adapters, weight, form, layout if layout is not None else Layout(adapters))


Factor = tuple[torch.Tensor, torch.Tensor]  # (parameter, its whole value)


def _factor_groups(factors: Sequence[tuple[bool, Factor]]) -> dict[tuple, list[tuple[bool, list[Factor]]]]:
    """The factors by the (r, r) buffer their Gram deviations share, ``(r, dtype, device)``, each as a list of
    ``(is P, factors of one shape)``: P (d_out, r) has Gram matrix P^T P, Q (r, d_in) has Q Q^T."""
    stacks: dict[tuple, list[Factor]] = {}
    for is_p, (param, value) in factors:
        stacks.setdefault((value.shape, value.dtype, value.device, is_p), []).append((param, value))
    buffers: dict[tuple, list[tuple[bool, list[Factor]]]] = {}
    for (shape, dtype, device, is_p), members in stacks.items():
        buffers.setdefault((shape[-1] if is_p else shape[-2], dtype, device), []).append((is_p, members))
    return buffers


@torch.no_grad()
def _add_closed_form_gradient(
    adapters: Sequence[SVDAdapter], weight: float, form: RegularizerForm, layout: Layout
) -> torch.Tensor:
    """:func:`add_regularization_gradient` for unsharded factors, read and written through ``layout``.

    Every factor is grouped with the factors of the same shape, P's and Q's separately: one stack and two batched
    matmuls per group (the cost grows with the number of shapes, not of adapters); the (r, r) Gram deviations of
    every group are written into one buffer so that their norms and the reference form's 1/||D|| scaling take one
    operation each; one multi-tensor add puts it all into the gradients.
    """
    n = sum(a.num_matrices for a in adapters)  # an expert of a fused MoE weight is one matrix
    factor_params = [p for a in adapters for p in (a.P, a.Q)]
    values = layout.values(factor_params)  # whole, wherever they live
    factors = [(i % 2 == 0, pair) for i, pair in enumerate(zip(factor_params, values, strict=True))]
    params: list[torch.Tensor] = []
    updates: list[torch.Tensor] = []
    norm_groups: list[torch.Tensor] = []
    for (r, dtype, device), groups in _factor_groups(factors).items():
        eye = torch.eye(r, dtype=dtype, device=device)
        # (g, d_out, r) for P, (g, r, d_in) for Q; the experts of fused MoE weights are matrices of their own.
        stacks = [torch.stack([v for _, v in members]).flatten(0, -3) for _, members in groups]
        sizes = [len(x) for x in stacks]
        deviations = torch.empty(sum(sizes), r, r, dtype=dtype, device=device)  # (G, r, r), all groups of this r
        for (is_p, _), x, deviation in zip(groups, stacks, deviations.split(sizes), strict=True):
            a, b = (x.mT, x) if is_p else (x, x.mT)
            torch.baddbmm(eye, a, b, beta=-1, out=deviation)  # P^T P - I or Q Q^T - I, symmetric
        norms = torch.linalg.matrix_norm(deviations)  # (G,)
        norm_groups.append(norms)
        if form == "paper":
            deviations *= 4.0 * weight
        else:
            # weight / (n ||D||), and 0 where ||D|| = 0 (the subgradient autograd takes): 1/0 = inf -> 0.
            coefficient = norms.reciprocal().nan_to_num_(posinf=0.0).mul_(weight / n)
            deviations *= coefficient[:, None, None]  # scale the small (r, r) factor, not the (d, r) product
        for (is_p, members), x, deviation in zip(groups, stacks, deviations.split(sizes), strict=True):
            grad = torch.bmm(x, deviation) if is_p else torch.bmm(deviation, x)  # P D or D Q
            params.extend(p for p, _ in members)
            updates.extend(grad.view(len(members), *members[0][1].shape).unbind(0))
    layout.add_gradients(params, updates)
    norms = norm_groups[0] if len(norm_groups) == 1 else torch.cat(norm_groups)  # (2n,): every deviation's norm
    if form == "paper":
        return norms.square().sum().mul_(weight)
    return norms.sum().mul_(weight / (2 * n))
