"""Orthogonality regulariser R(P, Q) that keeps P and Q close to orthonormal (paper eq. 4).

Two forms (docs/algorithm.md, the regulariser):

- ``"paper"``:     sum over adapters of ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2;
- ``"reference"``: mean over all 2n matrices of ||P^T P - I||_F and ||Q Q^T - I||_F (norm not squared),
                   as in the authors' code and PEFT. The default.

The caller multiplies by gamma (``orth_reg_weight``) and adds the result to whatever loss it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .layers import SVDAdapter

if TYPE_CHECKING:
    from .config import RegularizerForm


def gram_deviations(adapters: Sequence[SVDAdapter]) -> list[torch.Tensor]:
    """P^T P - I and Q Q^T - I for every adapter, batched by shape: a list of ``(g, r, r)`` stacks, differentiable.

    Adapters of equal shape are stacked so that a whole group costs one batched matmul forward and two backward
    (72 DeBERTa-sized adapters: 12 groups' worth of kernels instead of 216 small ones).
    """
    groups: dict[tuple, list[SVDAdapter]] = {}
    for a in adapters:
        groups.setdefault((a.P.shape, a.Q.shape, a.P.dtype, a.P.device), []).append(a)
    out = []
    for (p_shape, _, dtype, device), members in groups.items():
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
