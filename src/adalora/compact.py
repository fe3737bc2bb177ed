"""Shrinking adapters to their kept rank: physically drop the masked triplets.

During training a masked triplet only has its lambda zeroed (docs/algorithm.md, section 1): P and Q keep their
full ``init_r`` columns/rows so that the triplet can come back at a later allocation. Once the rank pattern is
final nothing can come back, so the final phase (and inference) can run with ``(d_out, k)``, ``(k,)`` and
``(k, d_in)`` factors, k = kept rank. Compaction does not change the model's outputs: the dropped triplets
have lambda = 0.

The adapter modules are shrunk in place; their P, E and Q become new, smaller ``nn.Parameter`` objects (with
their gradients sliced too). An optimizer built on the old ones must follow: pass it to :func:`compact` and its
``param_groups`` are repointed and its per-parameter state (Adam's moments, SGD's momentum) is sliced the same
way, so training continues exactly as it would have on the uncompacted model. Other references to the old
parameter objects (a list of parameters kept aside, hooks registered on them) do not follow; re-read
``model.parameters()`` after compacting. Not supported under DDP/FSDP/DeepSpeed, which flatten parameters:
compact before wrapping the model, or not at all.

The scale stays ``alpha / init_r`` (reference behaviour), not ``alpha / k``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .layers import TRIPLET_DIMS, SVDAdapter, find_adapters, kept_triplets, take_triplets


def compact(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Cut every adapter of ``model`` to the triplets its ``rank_mask`` keeps, in place.

    Call it once the rank pattern is final (after the RankAllocator's final allocation, or after training):
    the dropped triplets are gone for good, and a RankAllocator still in its budgeting phase would no longer
    match the adapters. ``AdaLoRAConfig(compact_at_final=True)`` makes the allocator call this for you at the
    final allocation.

    Args:
        model: a model with AdaLoRA adapters.
        optimizer: the optimizer training the adapters, if training goes on. Its state for P, E and Q is sliced
            to the kept triplets in place. Every per-parameter state tensor must either have the parameter's
            shape (Adam's ``exp_avg``/``exp_avg_sq``, SGD's ``momentum_buffer``, ...) or be a scalar (``step``).

    Returns:
        {module name: rank after compaction}, in module order.

    Raises:
        ValueError: if the model has no adapters, or the optimizer holds state that cannot be sliced (e.g. a
            factored second moment); then nothing is changed and the optimizer should be rebuilt after
            ``compact(model)`` instead.
    """
    named = find_adapters(model)
    if not named:
        raise ValueError("compact: the model has no AdaLoRA adapters; nothing to compact.")
    keeps = dict(zip((n for n, _ in named), kept_triplets([a for _, a in named]), strict=True))  # one host sync
    if optimizer is not None:
        _check_optimizer_state(optimizer, named)
    for name, adapter in named:
        _select_triplets(adapter, keeps[name], optimizer)
    return {name: adapter.r for name, adapter in named}


def resize_adapters(model: nn.Module, ranks: Mapping[str, int]) -> None:
    """Give each named adapter ``ranks[name]`` triplets (its first ones), e.g. before loading saved values.

    This is the shape half of :func:`compact` for a model whose values will be overwritten next (loading a saved
    adapter or a training checkpoint of a compacted model); the values kept are meaningless on their own.

    Args:
        model: a model with AdaLoRA adapters.
        ranks: {module name: new rank}; every name must be an adapter of ``model`` and ``0 <= rank <= r``.

    Raises:
        ValueError: on an unknown module name or a rank outside ``[0, r]``.
    """
    adapters = dict(find_adapters(model))
    unknown = sorted(set(ranks) - set(adapters))
    if unknown:
        raise ValueError(f"resize_adapters: no adapter named {unknown[:4]} in this model.")
    for name, rank in ranks.items():
        adapter = adapters[name]
        if not 0 <= rank <= adapter.r:
            raise ValueError(
                f"resize_adapters: rank {rank} for '{name}' must lie in [0, {adapter.r}] (its current rank)."
            )
        first = torch.arange(rank).expand(*adapter.rank_mask.shape[:-1], rank)  # the same for every expert
        _select_triplets(adapter, first, None)


@torch.no_grad()
def _select_triplets(adapter: SVDAdapter, keep: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    """Keep triplets ``keep`` of ``adapter``: P[..., keep], E[..., keep], Q[..., keep, :].

    ``keep`` is ``(k,)`` for one matrix, ``(experts, k)`` for fused experts (:func:`kept_triplets`).
    """
    if keep.shape[-1] == adapter.r:
        return  # already minimal (e.g. compacted twice): nothing moves
    keep = keep.to(adapter.E.device)
    kept = adapter.kept_factors(keep)
    for (attr, dim), value in zip(TRIPLET_DIMS, (kept.P, kept.E, kept.Q), strict=True):
        old: nn.Parameter = getattr(adapter, attr)
        # A new Parameter rather than ``old.data = ...``: autograd caches a parameter's gradient accumulator,
        # with its shape, for as long as any graph that used it is alive (the ``loss`` of the step just taken
        # still is when RankAllocator.step() calls us), and the next backward would then fail on the old shape.
        new = nn.Parameter(value, requires_grad=old.requires_grad)
        if old.grad is not None:
            new.grad = take_triplets(old.grad, dim, keep)
            old.grad = None
        setattr(adapter, attr, new)
        if optimizer is not None:
            _move_optimizer_state(optimizer, old, new, dim, keep)
    # All True now, but for the rows of fused experts padded up to the largest kept rank; assigning keeps it a
    # registered buffer.
    adapter.rank_mask = take_triplets(adapter.rank_mask, -1, keep)


def _move_optimizer_state(
    optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, dim: int, keep: torch.Tensor
) -> None:
    """Point the optimizer at ``new`` instead of ``old``, with ``old``'s per-parameter state sliced to ``keep``.

    Everything is changed in place (the ``params`` lists and the ``state`` dict), so wrappers that forward to
    the optimizer's ``param_groups``/``state`` (e.g. accelerate's ``AcceleratedOptimizer``) see the change.
    """
    for group in optimizer.param_groups:
        params = group["params"]
        for i, param in enumerate(params):
            if param is old:
                params[i] = new
    if old in optimizer.state:
        state = optimizer.state.pop(old)
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == old.shape:
                state[key] = take_triplets(value, dim, keep.to(value.device))
        optimizer.state[new] = state


def _check_optimizer_state(optimizer: torch.optim.Optimizer, named: list[tuple[str, SVDAdapter]]) -> None:
    """Refuse, before anything changes, optimizer state that cannot be sliced along the triplet dimension."""
    for name, adapter in named:
        for attr, _ in TRIPLET_DIMS:
            param = getattr(adapter, attr)
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.shape != param.shape and value.numel() > 1:
                    raise ValueError(
                        f"compact: the optimizer's state '{key}' for {name}.{attr} has shape {tuple(value.shape)}, "
                        f"not the parameter's {tuple(param.shape)}, so it cannot be sliced to the kept triplets "
                        f"({type(optimizer).__name__} keeps factored or flattened state). Call "
                        "adalora.compact(model) without the optimizer and build a new optimizer afterwards."
                    )
