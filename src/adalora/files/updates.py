"""The trained update of every adapted module, as the export formats read it (from a model or an adapter file).

Every export (PEFT LoRA, and any other format) writes the same thing: for each adapted module its kept triplets
(:class:`~adalora.layers.KeptFactors`), its scale, its layer type and its base layout. :func:`updates_from_model`
reads them from a model with adapters, :func:`updates_from_adapter` from a saved adapter directory, so a format
writer never needs to know where they came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..layers import KeptFactors, SVDAdapter, SVDExperts, adapter_class_named, find_adapters, kept_triplets


@dataclass(frozen=True)
class ModuleUpdate:
    """One adapted module's kept triplets and what a format needs to lay them out.

    Attributes:
        name: the module's qualified name in the model.
        layer_type: the layer type as adapter files record it (see ``adalora.layers.registry``).
        factors: P ``(d_out, k)``, lambda ``(k,)``, Q ``(k, d_in)`` and the scale, on the CPU.
        weight_shape: the base weight's shape (the kernel layout of a convolution).
        options: the adapter's ``layer_options()`` (kernel settings, padding index, ...).
        expert_ranks: for the fused expert weight of an MoE block, each expert's kept rank (``factors`` hold them
            all at the largest, zero-padded); empty for other layers.
    """

    name: str
    layer_type: str
    factors: KeptFactors
    weight_shape: tuple[int, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    expert_ranks: tuple[int, ...] = ()

    @property
    def rank(self) -> int:
        return self.factors.rank

    @property
    def adapter_class(self) -> type[SVDAdapter]:
        return adapter_class_named(self.layer_type)


def updates_from_model(model: nn.Module) -> list[ModuleUpdate]:
    """The update of every adapter of ``model`` (names relative to any compile/DDP wrapper), in module order."""
    named = find_adapters(model)
    return [
        ModuleUpdate(
            name,
            adapter.layer_type_name(adapter),
            adapter.kept_factors(keep).to("cpu"),
            adapter.base_shape(),
            adapter.layer_options(),
            tuple(adapter.rank_mask.sum(-1).tolist()) if isinstance(adapter, SVDExperts) else (),
        )
        for (name, adapter), keep in zip(named, kept_triplets([a for _, a in named]), strict=True)
    ]


def updates_from_adapter(info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[ModuleUpdate]:
    """The update of every module of a saved adapter (``read_adapter_config`` and its checked weights)."""
    return [
        ModuleUpdate(
            name,
            meta["type"],
            KeptFactors(tensors[f"{name}.P"], tensors[f"{name}.E"], tensors[f"{name}.Q"], float(meta["scale"])),
            tuple(meta.get("weight_shape", ())),
            meta.get("layer", {}),
            tuple(meta.get("expert_ranks", ())),
        )
        for name, meta in info["modules"].items()
    ]
