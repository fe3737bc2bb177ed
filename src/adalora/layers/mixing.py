"""The triplets' output side as one autograd function: ``y = out + scale * h diag(lambda) P^T``.

Every adapter whose update acts on the last dimension (linear layers, GPT-2 ``Conv1D``, embeddings) computes
``h = x Q^T`` (or gathers Q's columns) and then mixes the r numbers of ``h`` with ``P diag(lambda)``, scaled and
added to the base layer's output. Written with autograd's own operations that mix costs 7 operations forward and
backward for LoRA and 3 more for lambda's gradient (the activations ``h * lambda * scale`` and their products with
the incoming gradient); as one function it costs 5 (LoRA, lambda frozen) or 6 (AdaLoRA):

    forward    PL = P * lambda                            (d_out, r)   lambda folded into P's columns
               y  = addmm(out, h, PL^T, alpha=scale)      (M, d_out)   scale and the residual add in the product
    backward   dPL = scale * G^T h                        (d_out, r)   one product (``addmm`` with beta = 0)
               dP  = dPL * lambda                         (d_out, r)
               dlambda_i = sum_j dPL[j, i] P[j, i]        (r,)         r dot products as one batched product
               dh  = scale * G PL                         (M, r)       one product

so lambda's gradient is one operation per adapter, and every elementwise pass is over ``(d_out, r)`` (never over
the ``(M, r)`` activations, whose size grows with the batch). The activation kept for backward is ``h`` alone, as
for a LoRA layer: AdaLoRA's adapter path holds no more memory than LoRA's.

:func:`linear_svd` is the same for a frozen linear base computed in the same function, so that the input's
gradient of the base and of the adapter is one product and one accumulating product.
"""

from __future__ import annotations

from typing import Any

import torch


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float, ignored: torch.Tensor) -> torch.Tensor:
    """``scale * a @ b`` in one kernel: ``addmm`` with ``beta = 0`` never reads its input.

    Args:
        a: ``(m, k)``.
        b: ``(k, n)``.
        ignored: any one-element tensor of the result's dtype and device (broadcastable to ``(m, n)``).

    Returns:
        ``(m, n)``.
    """
    return torch.addmm(ignored, a, b, beta=0.0, alpha=scale)


def column_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(0)`` as one batched product: r dot products of length n.

    The operands are laid out so that every batch is a BLAS-compatible ``(1, n) @ (n, 1)`` product without a copy
    (column-major with leading dimension r on the left, row-major on the right).

    Args:
        a, b: ``(n, r)`` contiguous.

    Returns:
        ``(r,)``.
    """
    r = a.shape[1]
    return torch.bmm(a.unsqueeze(2).permute(1, 2, 0), b.mT.unsqueeze(2)).view(r)


class _SVDMix(torch.autograd.Function):
    """``out + scale * h (P diag(lambda))^T`` (or without ``out``) with the gradients written out; see the module."""

    @staticmethod
    def forward(
        ctx: Any, out: torch.Tensor | None, h: torch.Tensor, P: torch.Tensor, E: torch.Tensor, scale: float
    ) -> torch.Tensor:
        pl = P * E  # (d_out, r)
        y = _scaled_mm(h, pl.mT, scale, E[:1]) if out is None else torch.addmm(out, h, pl.mT, alpha=scale)
        ctx.save_for_backward(h, P, E, pl)
        ctx.scale = scale
        # Under autocast the backward's products must run in the forward's precision, as torch.amp.custom_bwd does
        # (which needs the device type when the class is defined; here it is the input's).
        ctx.device_type = h.device.type
        ctx.autocast = torch.is_autocast_enabled(ctx.device_type)
        ctx.autocast_dtype = torch.get_autocast_dtype(ctx.device_type)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, P, E, pl = ctx.saved_tensors
        need_out, need_h, need_p, need_e, _ = ctx.needs_input_grad
        with torch.autocast(ctx.device_type, dtype=ctx.autocast_dtype, enabled=ctx.autocast):
            ignored = E[:1]
            grad_h = _scaled_mm(grad, pl, ctx.scale, ignored) if need_h else None
            grad_p = grad_e = None
            if need_p or need_e:
                grad_pl = _scaled_mm(grad.mT, h, ctx.scale, ignored)  # (d_out, r)
                grad_p = grad_pl * E if need_p else None
                grad_e = column_dots(grad_pl, P) if need_e else None
        return (grad if need_out else None), grad_h, grad_p, grad_e, None


def svd_mix(
    h: torch.Tensor, P: torch.Tensor, E: torch.Tensor, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``out + scale * (h * lambda) P^T`` over the last dimension, forward and backward in the fewest operations.

    Args:
        h: the triplets' inputs ``(..., r)`` (``x Q^T`` or Q's gathered columns), in the adapter's dtype.
        P: ``(d_out, r)``.
        E: lambda, ``(r,)``.
        scale: ``alpha / init_r``.
        out: the base layer's output ``(..., d_out)`` in ``h``'s dtype, to which the update is added in the same
            product; None for the update alone.

    Returns:
        ``(..., d_out)`` in ``h``'s dtype.
    """
    lead = h.shape[:-1]
    h2 = h.reshape(-1, h.shape[-1])  # a view for the contiguous activations of linear layers
    out2 = None if out is None else out.reshape(-1, out.shape[-1])
    return _SVDMix.apply(out2, h2, P, E, scale).view(*lead, P.shape[0])


class _LinearSVD(torch.autograd.Function):
    """A frozen linear layer and its adapter as one function: ``x W^T + b + scale * (x Q^T) (P diag(lambda))^T``.

    The same operations as the base layer followed by :func:`svd_mix`, but for the input's gradient: the base
    layer's ``G W`` and the adapter's ``dh Q`` are one product and one accumulating product (``addmm``) instead of
    two products and a sum.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        W: torch.Tensor,
        b: torch.Tensor | None,
        Q: torch.Tensor,
        P: torch.Tensor,
        E: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        out = torch.mm(x, W.mT) if b is None else torch.addmm(b, x, W.mT)
        h = torch.mm(x, Q.mT)  # (M, r)
        pl = P * E
        ctx.save_for_backward(x, W, Q, P, E, pl, h)
        ctx.scale = scale
        return torch.addmm(out, h, pl.mT, alpha=scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, W, Q, P, E, pl, h = ctx.saved_tensors
        need_x, _, need_b, need_q, need_p, need_e, _ = ctx.needs_input_grad
        ignored = E[:1]
        grad_x = grad_b = grad_q = grad_p = grad_e = None
        if need_x or need_q:
            grad_h = _scaled_mm(grad, pl, ctx.scale, ignored)  # (M, r)
            if need_q:
                grad_q = torch.mm(grad_h.mT, x)
            if need_x:
                grad_x = torch.addmm(torch.mm(grad, W), grad_h, Q)
        if need_p or need_e:
            grad_pl = _scaled_mm(grad.mT, h, ctx.scale, ignored)
            grad_p = grad_pl * E if need_p else None
            grad_e = column_dots(grad_pl, P) if need_e else None
        if need_b:
            grad_b = grad.sum(0)
        return grad_x, None, grad_b, grad_q, grad_p, grad_e, None


def linear_svd(
    x: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None,
    Q: torch.Tensor,
    P: torch.Tensor,
    E: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``F.linear(x, W, b) + scale * ((x Q^T) * lambda) P^T`` for a frozen ``W`` (no gradient is computed for it).

    Args:
        x: ``(..., d_in)``, in the dtype of ``W``, ``Q``, ``P`` and lambda; no autocast (the caller checks).
        W: the frozen base weight ``(d_out, d_in)``.
        b: the base bias ``(d_out,)`` (may train) or None.
        Q: ``(r, d_in)``. P: ``(d_out, r)``. E: lambda, ``(r,)``.
        scale: ``alpha / init_r``.

    Returns:
        ``(..., d_out)``.
    """
    lead = x.shape[:-1]
    y = _LinearSVD.apply(x.reshape(-1, x.shape[-1]), W, b, Q, P, E, scale)
    return y.view(*lead, W.shape[0])
