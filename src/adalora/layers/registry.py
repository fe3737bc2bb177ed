"""The layer types AdaLoRA can adapt: one table, the only place that says which base layers are supported.

Each entry names the layer type as adapter files record it, says which modules it matches, gives the adapter class
that knows everything else about that type (how it is built from a base layer, ``from_base``; how it computes,
``base_forward``/``adapted_forward``; its PEFT tensor layout, ``lora_tensors``; how it merges, ``delta_weight``,
``to_base``) and, for a quantized kind, how ``adalora train --quantize`` makes one. Entries are tried in order, so
a subclass (a quantized ``nn.Linear``) comes before its base class. Adding a layer type is one new adapter class,
one entry here and its tests; everything that lists layer types (error messages, ``--quantize``'s choices,
adapter fingerprints) reads this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .base import SVDAdapter, overrides
from .conv import SVDConv
from .embedding import SVDEmbedding
from .experts import FusedWeight, SVDExperts, supported_experts
from .linear import SVDConv1D, SVDLinear, conv1d_type
from .quantized import (
    Quantization,
    QuantizedAdapter,
    SVDLinear4bit,
    SVDLinear8bitLt,
    SVDTorchAOLinear,
    dtype_name,
    is_bnb_4bit,
    is_bnb_8bit,
    torchao_kind,
    torchao_linear,
)


@dataclass(frozen=True)
class LayerType:
    """One supported kind of base layer.

    Attributes:
        names: the ``layer_type`` names adapter files record for it (one per variant, e.g. conv dimensions); a
            quantized kind records the float layer's name (an adapter moves between a quantized base and the
            float one), so it has none of its own.
        description: how error messages name it.
        matches: whether a module is of this type.
        adapter: the adapter class that replaces it.
        quantization: for a quantized kind, how ``--quantize`` makes one from an ``nn.Linear``.
    """

    names: tuple[str, ...]
    description: str
    matches: Callable[[nn.Module], bool]
    adapter: type[SVDAdapter]
    quantization: Quantization | None = None


def _is_gpt2_conv1d(module: nn.Module) -> bool:
    conv1d = conv1d_type()  # imports transformers, so this entry comes after the torch types
    return conv1d is not None and isinstance(module, conv1d)


def _at_least_64_inputs(linear: nn.Linear) -> bool:
    # bitsandbytes' CPU inference kernel repacks 4-bit weights in blocks of 64 inputs and fails on fewer.
    return linear.in_features >= 64


def _whole_blocks_of_64(linear: nn.Linear) -> bool:
    return linear.weight.numel() % 64 == 0


def _any_linear(linear: nn.Linear) -> bool:
    return True


LAYER_TYPES: tuple[LayerType, ...] = (
    LayerType(
        (), "bitsandbytes Linear4bit (nf4/fp4)", is_bnb_4bit, SVDLinear4bit,
        Quantization("bnb-4bit", "bitsandbytes", _at_least_64_inputs, SVDLinear4bit.quantize),
    ),
    LayerType(
        (), "bitsandbytes Linear8bitLt", is_bnb_8bit, SVDLinear8bitLt,
        Quantization("bnb-8bit", "bitsandbytes", _any_linear, SVDLinear8bitLt.quantize),
    ),
    LayerType(
        (), "nn.Linear with a torchao NF4 weight", torchao_linear("torchao-nf4"), SVDTorchAOLinear,
        Quantization("torchao-nf4", "torchao", _whole_blocks_of_64, SVDTorchAOLinear.quantize_nf4),
    ),
    LayerType(
        (), "nn.Linear with a torchao int8 weight-only weight", torchao_linear("torchao-int8"), SVDTorchAOLinear,
        Quantization("torchao-int8", "torchao", _any_linear, SVDTorchAOLinear.quantize_int8),
    ),
    LayerType(("linear",), "nn.Linear", lambda m: isinstance(m, nn.Linear), SVDLinear),
    LayerType(
        ("nn_conv1d", "nn_conv2d", "nn_conv3d"),
        "nn.Conv1d/2d/3d",
        lambda m: isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d),
        SVDConv,
    ),
    LayerType(("embedding",), "nn.Embedding", lambda m: isinstance(m, nn.Embedding), SVDEmbedding),
    LayerType(("conv1d",), "transformers' GPT-2 Conv1D", _is_gpt2_conv1d, SVDConv1D),
    # A fused 3-D expert weight of an MoE block (named in target_parameters, or every one of a block named in
    # target_modules): a (block, parameter name) pair rather than a module, which no entry above matches.
    LayerType(
        ("experts",), f"the fused expert weights of the MoE blocks {supported_experts()}",
        lambda m: isinstance(m, FusedWeight), SVDExperts,
    ),
)  # fmt: skip

QUANTIZATIONS: dict[str, Quantization] = {t.quantization.method: t.quantization for t in LAYER_TYPES if t.quantization}
"""``--quantize`` methods, in table order."""


def _in_words(descriptions: list[str]) -> str:
    return ", ".join(descriptions[:-1]) + " or " + descriptions[-1] if len(descriptions) > 1 else descriptions[0]


def supported_layers() -> str:
    """The supported base layers in words, for error messages."""
    return _in_words([t.description for t in LAYER_TYPES])


def supported_quantized() -> str:
    """The supported quantized layers in words, for error messages."""
    return _in_words([t.description for t in LAYER_TYPES if t.quantization is not None])


def layer_type_of(module: nn.Module | FusedWeight) -> LayerType | None:
    """The entry of ``module``'s type (the first that matches), or None if it is not supported or an adapter."""
    if isinstance(module, SVDAdapter):
        return None
    return next((t for t in LAYER_TYPES if t.matches(module)), None)


def adapter_class_for(module: nn.Module | FusedWeight) -> type[SVDAdapter] | None:
    """The adapter type that can replace ``module``, or None if its type is not supported (see also
    :func:`refusal`: some modules of a supported type still cannot be adapted)."""
    entry = layer_type_of(module)
    return None if entry is None else entry.adapter


def refusal(module: nn.Module | FusedWeight) -> str | None:
    """Why ``module``, of a supported type, cannot be adapted (None if it can).

    An ``nn.Linear`` subclass with a forward of its own (a quantized layer of a library without an entry here) or
    a weight of a torchao kind without one would have its computation silently replaced by a plain product: refused,
    naming the supported quantized layers. Otherwise the adapter class says (an embedding with ``max_norm``, a
    4-bit layer not yet quantized, ...).
    """
    entry = layer_type_of(module)
    if entry is not None and entry.adapter is SVDLinear:
        if overrides(module, nn.Linear, "forward"):
            return (
                f"{type(module).__module__}.{type(module).__qualname__} is an nn.Linear subclass with its own "
                f"forward, which an adapter cannot reproduce; supported linear layers are nn.Linear, GPT-2 Conv1D "
                f"and the quantized {supported_quantized()}"
            )
        kind = torchao_kind(module.weight)
        if kind is not None:
            return f"its weight is a {kind} tensor; supported quantized layers are {supported_quantized()}"
    return None if entry is None else entry.adapter.unsupported_reason(module)


def adapter_class_named(layer_type: str) -> type[SVDAdapter]:
    """The adapter class of a ``layer_type`` recorded in an adapter file.

    Raises:
        ValueError: if no entry has that name (a file written by a newer version).
    """
    for entry in LAYER_TYPES:
        if layer_type in entry.names:
            return entry.adapter
    known = ", ".join(name for entry in LAYER_TYPES for name in entry.names)
    raise ValueError(f"layer type '{layer_type}' is unknown to this version of adalora (known: {known}).")


def precision_of(tensor: torch.Tensor) -> str:
    """How a base parameter is stored: its quantized kind (``"bnb-nf4-dq"``, ``"torchao-int8"``) if a quantized
    entry knows it, else its dtype (``"float32"``)."""
    for adapter in dict.fromkeys(t.adapter for t in LAYER_TYPES if issubclass(t.adapter, QuantizedAdapter)):
        kind = adapter.storage_kind(tensor)  # type: ignore[attr-defined]
        if kind is not None:
            return kind
    return dtype_name(tensor)
