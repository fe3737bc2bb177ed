"""The regulariser as a gradient: the one mechanism every integration uses to apply gamma * R.

Adding ``gamma * R`` to a loss relies on how a trainer scales and fuses that loss (divided by the accumulation
steps or not, normalised by a token count or not, replaced by a fused kernel); adding ``gamma * dR/dP`` and
``gamma * dR/dQ`` to the accumulated gradients once per optimizer step, just before ``optimizer.step()``, does
not. Whatever the trainer did to its loss, each optimizer step then carries the regulariser exactly once.
"""

from __future__ import annotations

import torch

from ..allocator import RankAllocator


def add_regularizer_gradient(allocator: RankAllocator) -> torch.Tensor:
    """Add ``gamma * dR/dP, dR/dQ`` over all of ``allocator``'s adapters to their ``.grad``; once per step.

    Call it after the last backward pass of an optimizer step and before ``optimizer.step()`` (and before the
    allocator's ``importance_timing="before_step"`` hook, which runs inside ``optimizer.step()``, so that
    importance is measured on the gradient of the whole training objective, task loss + gamma * R, as with the
    regulariser in the loss).

    Returns:
        ``gamma * R`` before the update, a detached 0-dim tensor (zero when ``orth_reg_weight`` is 0).
    """
    return allocator.add_regularization_gradient()
