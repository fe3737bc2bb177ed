"""Orthogonality regulariser R(P, Q) that keeps P and Q close to orthonormal (paper eq. 4).

Two forms (``ALGORITHM.md`` section 2):

- ``"paper"``:     sum over adapters of ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2;
- ``"reference"``: mean over all 2n matrices of ||P^T P - I||_F and ||Q Q^T - I||_F (norm not squared),
                   as in the authors' code and PEFT. The default.

The caller multiplies by gamma (``orth_reg_weight``) and adds the result to whatever loss it has.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import RegularizerForm
from .layers import SVDAdapter


def gram_deviations(adapters: Sequence[SVDAdapter]) -> list[torch.Tensor]:
    """[P_1^T P_1 - I, Q_1 Q_1^T - I, P_2^T P_2 - I, ...], each ``(r, r)``, differentiable."""
    mats = []
    for a in adapters:
        mats.append(a.P.T)  # (r, d_out): P^T P = (P^T)(P^T)^T
        mats.append(a.Q)  # (r, d_in)
    grams = torch._foreach_mm(mats, [m.T for m in mats]) if mats else []
    eyes = {}
    out = []
    for gram in grams:
        key = (gram.shape[0], gram.dtype, gram.device)
        if key not in eyes:
            eyes[key] = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        out.append(gram - eyes[key])
    return out


def orthogonal_penalty(adapters: Sequence[SVDAdapter], form: RegularizerForm = "reference") -> torch.Tensor:
    """R summed (paper) or averaged (reference) over ``adapters``; a 0-dim tensor with gradient.

    Returns zero (without gradient) when there are no adapters.
    """
    deviations = gram_deviations(adapters)
    if not deviations:
        return torch.zeros(())
    if form == "paper":
        squares = torch._foreach_mul(deviations, deviations)
        return torch.stack([s.sum() for s in squares]).sum()
    if form == "reference":
        norms = torch._foreach_norm(deviations)
        return torch.stack(norms).mean()
    raise ValueError(f"orthogonal_penalty: unknown form {form!r}; choose 'reference' or 'paper'")
