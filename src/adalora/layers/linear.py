"""Adapters for linear layers: ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (a linear layer with a transposed
weight)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import SVDAdapter, overrides
from .mixing import linear_svd


class _FusedLinear(SVDAdapter):
    """A linear adapter that, when it can, runs its frozen base layer and its update as one function.

    :func:`~adalora.layers.mixing.linear_svd` computes the input's gradient of both paths with one product less.
    It applies when the base weight is frozen, dropout is off, input, weight and adapter share a dtype and autocast
    is off; otherwise (and in any subclass that redefines how the base or the adapter computes, e.g. a quantized
    base) the adapter computes as every other adapter does.
    """

    _fuses_base: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if _FusedLinear in cls.__bases__:  # SVDLinear, SVDConv1D: their base_forward is what linear_svd computes
            cls._plain_base = cls.base_forward
        plain = getattr(cls, "_plain_base", None)
        cls._fuses_base = (
            cls.base_forward is plain
            and cls.project is SVDAdapter.project
            and cls.adapter_output is SVDAdapter.adapter_output
        )

    def _base_matrix(self) -> torch.Tensor:
        """The base weight as ``(d_out, d_in)`` (a view)."""
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self._fuses_base
            and self.adapter_enabled
            and self.r > 0
            and not self.weight.requires_grad
            and (isinstance(self.dropout, nn.Identity) or not self.dropout.training)
            and x.dtype == self.weight.dtype == self.Q.dtype
            and not torch.is_autocast_enabled(x.device.type)
        ):
            return linear_svd(x, self._base_matrix(), self.bias, self.Q, self.P, self.E, self.scale)
        return super().forward(x)


class SVDLinear(_FusedLinear):
    """Adapter for ``torch.nn.Linear``: ``weight`` is ``(d_out, d_in)``."""

    layer_type = "linear"

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        """Refuses ``nn.Linear`` subclasses that compute differently (quantized layers of other libraries, ...):
        the adapter computes ``F.linear(x, weight, bias)``, which would silently replace their forward."""
        from .quantized import SUPPORTED_QUANTIZED, torchao_kind

        if overrides(module, nn.Linear, "forward"):
            return (
                f"{type(module).__module__}.{type(module).__qualname__} is an nn.Linear subclass with its own "
                f"forward, which an adapter cannot reproduce; supported linear layers are nn.Linear, GPT-2 Conv1D "
                f"and the quantized {SUPPORTED_QUANTIZED}"
            )
        kind = torchao_kind(module.weight)
        if kind is not None:
            return f"its weight is a {kind} tensor; supported quantized layers are {SUPPORTED_QUANTIZED}"
        return None

    @classmethod
    def from_base(
        cls, module: nn.Linear, r: int, scale: float, dropout: float = 0.0, init_std: float = 0.02
    ) -> SVDLinear:
        d_out, d_in = module.weight.shape
        return cls(module.weight, module.bias, d_out, d_in, r, scale, dropout, init_std)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def to_base(self, weight: torch.Tensor) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``weight`` (base layout) and this adapter's bias."""
        module = nn.Linear(self.d_in, self.d_out, bias=self.bias is not None, device="meta")
        module.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            module.bias = self.bias
        return module


def conv1d_type() -> type[nn.Module] | None:
    """transformers' GPT-2 ``Conv1D`` (imported lazily so that plain PyTorch users never pay for it)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency, but stay usable without it
        return None
    return Conv1D


class SVDConv1D(_FusedLinear):
    """Adapter for transformers' GPT-2 ``Conv1D``, a linear layer with a transposed ``(d_in, d_out)`` weight."""

    layer_type = "conv1d"  # transformers' GPT-2 Conv1D (a linear layer); torch's nn.Conv1d is "nn_conv1d"
    peft_fan_in_fan_out = True  # GPT-2's Conv1D stores (d_in, d_out) weights; PEFT must know to merge correctly

    @classmethod
    def dims(cls, module: nn.Module) -> tuple[int, int]:
        d_in, d_out = module.weight.shape
        return d_out, d_in

    @classmethod
    def from_base(
        cls, module: nn.Module, r: int, scale: float, dropout: float = 0.0, init_std: float = 0.02
    ) -> SVDConv1D:
        d_out, d_in = cls.dims(module)
        return cls(module.weight, module.bias, d_out, d_in, r, scale, dropout, init_std)

    def _base_matrix(self) -> torch.Tensor:
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
