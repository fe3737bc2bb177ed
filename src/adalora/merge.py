"""Fold adapters into the base weights (``merge``) or drop them (``unload``): back to the base architecture.

``merge`` computes ``W = W0 + scale * P diag(lambda) Q`` (paper eq. 3) per adapted layer, in the base layer's
layout (a transposed matrix for GPT-2 ``Conv1D`` and ``nn.Embedding``, a kernel for ``nn.Conv*d``, one matrix per
expert for the fused expert weights of an MoE block), and puts a plain layer of the base type holding W (for fused
experts: the block's plain parameter, and the block computes with its own forward again) where the adapter was, so
the result needs no adapter code at inference and saves with ``save_pretrained`` like the original model.

A quantized base (bitsandbytes 4-bit/8-bit, torchao NF4/int8) is dequantized and merged into a plain float
``nn.Linear`` by default; ``requantize=True`` quantizes the merged weight again into the base's format instead
(smaller, but with a second rounding error: see docs/layer-types.md).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from .finite import require_finite
from .inject import _set_submodule
from .layers import QuantizedAdapter, SVDAdapter, find_adapters, release_blocks, unwrap_model


def merge(model: nn.Module, safe: bool = True, requantize: bool = False) -> nn.Module:
    """Replace every adapter by its base layer type with the update folded in, in place.

    The sum is formed in the adapter's dtype (float32 for half-precision bases) and rounded once to the base
    weight's dtype. Dropout does not enter: the merged model computes what the adapted model computes in
    ``eval()`` mode.

    Args:
        model: a model with AdaLoRA adapters (masked or compacted: masked triplets have lambda = 0).
        safe: check the adapters and the trained task head for NaN/inf (a diverged run: :mod:`adalora.finite`),
            then every merged weight, before replacing anything, and refuse (raising, with the model unchanged)
            if one is not finite. Costs one extra product per layer.
        requantize: for adapters on quantized bases, quantize the merged weight again into the base layer's
            format (same quantization type, block size and compute dtype) instead of returning a float layer.
            The result is as small as the quantized base but computes the merged model only to within the
            quantization's rounding error. No effect on unquantized bases.

    A merged layer whose base weight was shared with another module (an input embedding tied to the output
    projection, as in GPT-2 or SmolLM2) gets its own merged weight, while the other module keeps the original:
    that is what the adapted model computed. A transformers config's ``tie_word_embeddings`` is then set to
    False, so that ``save_pretrained``/``from_pretrained`` keep the two apart.

    Returns:
        ``model``, now without adapters. Parameters keep the ``requires_grad`` they had (merged weights are
        frozen, as the base weights were after :func:`adalora.inject`).

    Raises:
        ValueError: if the model has no adapters, or (``safe``) a merged weight is not finite.
    """
    wrapped, model = model, unwrap_model(model)  # a compiled/DDP model is changed inside, and returned as given
    named = _adapters_or_raise(model, "merge")
    if safe:
        _check_finite(model, named)
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    untied = False
    for name, adapter in named:
        untied |= uses[id(adapter.weight)] > 1  # another module (a tied output layer) keeps using the original
        weight = _merged_weight(adapter)
        base = (
            adapter.requantized(weight)
            if requantize and isinstance(adapter, QuantizedAdapter)
            else adapter.to_base(weight)
        )
        _put_back(model, name, adapter, base)
    release_blocks(model)
    config = getattr(model, "config", None)
    if untied and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False  # type: ignore[union-attr]
    return wrapped


def _check_finite(model: nn.Module, named: list[tuple[str, SVDAdapter]]) -> None:
    """Raise before anything is replaced if a trained tensor or a merged weight holds NaN or inf."""
    trained = {f"{name}.{attr}": getattr(adapter, attr) for name, adapter in named for attr in ("P", "E", "Q")}
    trained |= {name: param for name, param in model.named_parameters() if param.requires_grad}  # task head
    require_finite(trained.items(), "merge: the model's adapter")
    # A separate pass, so that nothing is replaced unless every layer merges cleanly, while holding only
    # one merged weight in memory at a time.
    for name, adapter in named:
        weight = _merged_weight(adapter)
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(
                f"merge: the merged weight of '{name}' contains NaN or inf (the adapter's P, E or Q diverged "
                "during training, or the base dtype overflowed); the model was left unchanged. Inspect the "
                "adapter, or call merge(model, safe=False) to merge anyway."
            )
        del weight


def unload(model: nn.Module) -> nn.Module:
    """Drop every adapter, putting back the base layers with their original (unmerged) weights, in place.

    The restored layers hold the very ``weight``/``bias`` ``Parameter`` objects of the original model (inject
    moved them into the adapters), so weight tying and references to them survive. Parameters stay frozen as
    :func:`adalora.inject` left them; call ``model.requires_grad_(True)`` for full fine-tuning.

    Returns:
        ``model``, now without adapters.

    Raises:
        ValueError: if the model has no adapters.
    """
    wrapped, model = model, unwrap_model(model)  # a compiled/DDP model is changed inside, and returned as given
    for name, adapter in _adapters_or_raise(model, "unload"):
        _put_back(model, name, adapter, adapter.unloaded())
    release_blocks(model)
    return wrapped


def _put_back(model: nn.Module, name: str, adapter: SVDAdapter, base: nn.Module | nn.Parameter) -> None:
    """Put the base layer (or, for fused experts, the base parameter) where the adapter was."""
    if isinstance(base, nn.Module):
        base.train(adapter.training)
    _set_submodule(model, name, base)


@torch.no_grad()
def _merged_weight(adapter: SVDAdapter) -> torch.Tensor:
    """W0 + delta in the base layout and dtype; the sum is taken in the adapter's (at least float32) dtype."""
    delta = adapter.delta_weight()
    base = adapter.dense_weight()  # a quantized base is dequantized (to the dtype it computes in)
    return (base.to(delta.dtype) + delta).to(base.dtype)


def _adapters_or_raise(model: nn.Module, caller: str) -> list[tuple[str, SVDAdapter]]:
    named = find_adapters(model)
    if not named:
        raise ValueError(f"{caller}: the model has no AdaLoRA adapters (already merged or unloaded?).")
    return named
