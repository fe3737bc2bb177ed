"""Shrinking adapters to their kept rank: physically drop the masked triplets.

During training a masked triplet only has its lambda zeroed (``ALGORITHM.md`` section 1): P and Q keep their
full ``init_r`` columns/rows so that the triplet can come back at a later allocation. Once the rank pattern is
final nothing can come back, so the final phase (and inference) can run with ``(d_out, k)``, ``(k,)`` and
``(k, d_in)`` factors, k = kept rank. Compaction does not change the model's outputs: the dropped triplets
have lambda = 0.

The adapters are shrunk in place and keep their ``nn.Parameter`` objects (only ``.data`` and ``.grad`` are
replaced), so every reference to them stays valid: the optimizer's ``param_groups``, the RankAllocator, hooks.
What does change shape is the optimizer's per-parameter state (Adam's moments, SGD's momentum): pass the
optimizer to :func:`compact` and that state is sliced the same way, so training continues exactly as it would
have on the uncompacted model.

The scale stays ``alpha / init_r`` (reference behaviour), not ``alpha / k``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .layers import SVDAdapter, find_adapters

# (attribute, dimension that indexes triplets): P is (d_out, r), E is (r,), Q is (r, d_in).
_TRIPLET_DIMS = (("P", 1), ("E", 0), ("Q", 0))


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
    # One host sync for the whole model rather than one per adapter.
    masks = [a.rank_mask for _, a in named]
    kept = torch.cat(masks).cpu().split([m.numel() for m in masks])
    keeps = {name: mask.nonzero().squeeze(1) for (name, _), mask in zip(named, kept, strict=True)}
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
        _select_triplets(adapter, torch.arange(rank), None)


@torch.no_grad()
def _select_triplets(adapter: SVDAdapter, keep: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    """Keep triplets ``keep`` (indices, ascending) of ``adapter``: P[:, keep], E[keep], Q[keep, :]."""
    if keep.numel() == adapter.r:
        return  # already minimal (e.g. compacted twice): nothing moves
    keep = keep.to(adapter.E.device)
    for attr, dim in _TRIPLET_DIMS:
        param: nn.Parameter = getattr(adapter, attr)
        old_shape = param.shape
        # Assigning .data keeps the Parameter object (optimizer, allocator and hooks hold it) and its
        # requires_grad; the gradient must follow, or the next optimizer step would see mismatched shapes.
        param.data = param.data.index_select(dim, keep)
        if param.grad is not None:
            param.grad = param.grad.index_select(dim, keep)
        if optimizer is not None:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == old_shape:
                    state[key] = value.index_select(dim, keep.to(value.device))
    adapter.rank_mask = adapter.rank_mask[keep]  # all True now; assigning keeps it a registered buffer


def _check_optimizer_state(optimizer: torch.optim.Optimizer, named: list[tuple[str, SVDAdapter]]) -> None:
    """Refuse, before anything changes, optimizer state that cannot be sliced along the triplet dimension."""
    for name, adapter in named:
        for attr, _ in _TRIPLET_DIMS:
            param = getattr(adapter, attr)
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.shape != param.shape and value.numel() > 1:
                    raise ValueError(
                        f"compact: the optimizer's state '{key}' for {name}.{attr} has shape {tuple(value.shape)}, "
                        f"not the parameter's {tuple(param.shape)}, so it cannot be sliced to the kept triplets "
                        f"({type(optimizer).__name__} keeps factored or flattened state). Call "
                        "adalora.compact(model) without the optimizer and build a new optimizer afterwards."
                    )
