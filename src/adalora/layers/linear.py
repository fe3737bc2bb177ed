"""Adapters for linear layers: ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (a linear layer with a transposed
weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import PAPER_START, SVDAdapter, TripletStart
from .mixing import linear_svd


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` ``(d_out, d_in)`` (frozen) and ``bias`` (the same object, or cast to the
    weight's dtype when it differs: bitsandbytes keeps the bias in its compute dtype)."""
    d_out, d_in = weight.shape
    module = nn.Linear(d_in, d_out, bias=bias is not None, device="meta")
    module.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        same = bias.dtype == weight.dtype
        module.bias = bias if same else nn.Parameter(bias.detach().to(weight.dtype), bias.requires_grad)
    return module


class _LinearAdapter(SVDAdapter):
    """A linear adapter that owns its frozen base weight and, when it can, computes base and update as one function.

    :func:`~adalora.layers.mixing.linear_svd` computes ``x W^T + b + scale * (x Q^T) diag(lambda) P^T`` with the
    input's gradient of both paths in one product less than computing them apart. It is exact only when both paths
    see the same ``x`` (dropout off), in one dtype (no autocast, and a base in the adapter's dtype), with a frozen
    base; otherwise the adapter computes as every other adapter does.
    """

    def __init__(
        self, module: nn.Module, r: int, scale: float, dropout: float = 0.0, start: TripletStart = PAPER_START
    ):
        d_out, d_in = self.dims(module)
        super().__init__(module.weight, d_out, d_in, r, scale, dropout, start)
        self.weight = module.weight
        self.bias = module.bias

    @classmethod
    def from_base(
        cls, module: nn.Module, r: int, scale: float, dropout: float = 0.0, start: TripletStart = PAPER_START
    ):
        return cls(module, r, scale, dropout, start)

    def base_matrix(self) -> torch.Tensor:
        """The base weight as ``(d_out, d_in)`` (a view)."""
        return self.weight

    def fusable(self, x: torch.Tensor) -> bool:
        """Whether :func:`linear_svd` computes this layer exactly for ``x`` (the class docstring says when)."""
        dropout_off = isinstance(self.dropout, nn.Identity) or not self.dropout.training
        one_dtype = x.dtype == self.weight.dtype == self.Q.dtype and not torch.is_autocast_enabled(x.device.type)
        return dropout_off and one_dtype and not self.weight.requires_grad

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fusable(x):
            return linear_svd(x, self.base_matrix(), self.bias, self.Q, self.P, self.E, self.scale)
        return super().adapted_forward(x)


class SVDLinear(_LinearAdapter):
    """Adapter for ``torch.nn.Linear``: ``weight`` is ``(d_out, d_in)``."""

    layer_type = "linear"

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def to_base(self, weight: torch.Tensor) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``weight`` (base layout) and this adapter's bias."""
        return plain_linear(weight, self.bias)


def conv1d_type() -> type[nn.Module] | None:
    """transformers' GPT-2 ``Conv1D`` (imported lazily so that plain PyTorch users never pay for it)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency, but stay usable without it
        return None
    return Conv1D


class SVDConv1D(_LinearAdapter):
    """Adapter for transformers' GPT-2 ``Conv1D``, a linear layer with a transposed ``(d_in, d_out)`` weight."""

    layer_type = "conv1d"  # transformers' GPT-2 Conv1D (a linear layer); torch's nn.Conv1d is "nn_conv1d"
    peft_fan_in_fan_out = True  # GPT-2's Conv1D stores (d_in, d_out) weights; PEFT must know to merge correctly

    @classmethod
    def dims(cls, module: nn.Module) -> tuple[int, int]:
        d_in, d_out = module.weight.shape
        return d_out, d_in

    def base_matrix(self) -> torch.Tensor:
        return self.weight.mT

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, self.d_in), self.weight)
        return out.view(*x.shape[:-1], self.d_out)

    def delta_weight(self) -> torch.Tensor:
        """The update in the base layout ``(d_in, d_out)``."""
        return super().delta_weight().T

    def to_base(self, weight: torch.Tensor) -> nn.Module:
        conv1d = conv1d_type()
        assert conv1d is not None
        module = conv1d(self.d_out, self.d_in)
        module.weight = nn.Parameter(weight, requires_grad=False)
        module.bias = self.bias
        return module
