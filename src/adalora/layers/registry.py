"""The layer types AdaLoRA can adapt: one table, the only place that says which base layers are supported.

Each entry names the layer type as adapter files record it, says which modules it matches, and gives the adapter
class that knows everything else about that type: how it is built from a base layer (``from_base``), how it
computes (``forward``), its PEFT tensor layout (``lora_tensors``) and how it merges (``delta_weight``,
``to_base``). Entries are tried in order, so a subclass (a quantized ``nn.Linear``) must come before its base
class. Adding a layer type is one new adapter class, one entry here and its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .base import SVDAdapter
from .conv import SVDConv
from .embedding import SVDEmbedding
from .experts import FusedWeight, SVDExperts, supported_experts
from .linear import SVDConv1D, SVDLinear, conv1d_type
from .quantized import SVDLinear4bit, SVDLinear8bitLt, SVDTorchAOLinear, is_bnb_4bit, is_bnb_8bit, is_torchao_linear


@dataclass(frozen=True)
class LayerType:
    """One supported kind of base layer.

    Attributes:
        names: the ``layer_type`` names adapter files record for it (one per variant, e.g. conv dimensions).
        description: how error messages name it.
        matches: whether a module is of this type.
        adapter: the adapter class that replaces it.
    """

    names: tuple[str, ...]
    description: str
    matches: Callable[[nn.Module], bool]
    adapter: type[SVDAdapter]


def _is_gpt2_conv1d(module: nn.Module) -> bool:
    conv1d = conv1d_type()  # imports transformers, so this entry comes after the torch types
    return conv1d is not None and isinstance(module, conv1d)


LAYER_TYPES: tuple[LayerType, ...] = (
    # Quantized linear layers first (nn.Linear subclasses, or nn.Linear holding a quantized weight). They record
    # the layer type "linear" in adapter files (no names of their own): an adapter moves between a quantized base
    # and the float one.
    LayerType((), "bitsandbytes Linear4bit (nf4/fp4)", is_bnb_4bit, SVDLinear4bit),
    LayerType((), "bitsandbytes Linear8bitLt", is_bnb_8bit, SVDLinear8bitLt),
    LayerType((), "nn.Linear with a torchao NF4 or int8 weight-only weight", is_torchao_linear, SVDTorchAOLinear),
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
        ("experts",),
        f"the fused expert weights of the MoE blocks {supported_experts()}",
        lambda m: isinstance(m, FusedWeight),
        SVDExperts,
    ),
)


def supported_layers() -> str:
    """The supported base layers in words, for error messages."""
    descriptions = [t.description for t in LAYER_TYPES]
    return ", ".join(descriptions[:-1]) + " or " + descriptions[-1]


def layer_type_of(module: nn.Module | FusedWeight) -> LayerType | None:
    """The entry of ``module``'s type (the first that matches), or None if it is not supported or an adapter."""
    if isinstance(module, SVDAdapter):
        return None
    return next((t for t in LAYER_TYPES if t.matches(module)), None)


def adapter_class_for(module: nn.Module | FusedWeight) -> type[SVDAdapter] | None:
    """The adapter type that can replace ``module``, or None if its type is not supported.

    Some modules of a supported type still cannot be adapted (e.g. an embedding with ``max_norm``): check
    ``adapter_class.unsupported_reason(module)`` too.
    """
    entry = layer_type_of(module)
    return None if entry is None else entry.adapter


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
