"""Adapter for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``: the triplets act as two convolutions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import PAPER_START, KeptFactors, SVDAdapter, TripletStart, overrides

_CONV_TYPES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_FNS: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class SVDConv(SVDAdapter):
    """Adapter for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``: the triplets act as two convolutions.

    The base kernel has shape ``(out, in / groups, *kernel_size)``; the update is the matrix
    ``scale * P diag(lambda) Q`` with ``P: (out, r)`` and ``Q: (r, in / groups * prod(kernel_size))``, viewed in the
    kernel's layout. The forward never forms that kernel (the update is linear in the kernel, so convolving with
    Q's r small kernels first and mixing their r output channels with P afterwards gives the same result):

        h = conv(dropout(x), Q viewed as (r, in / groups, *kernel_size))    same stride, padding, dilation
        y = base(x) + conv_1x1(h, scale * P diag(lambda))                     (out, r, 1, ...) kernel

    With ``groups = g > 1`` the base kernel is block-diagonal over channel groups, and so is the update: Q's r
    kernels are applied to every input group (a grouped convolution producing g * r channels) and output group j
    mixes the r channels computed from input group j (a grouped 1 x 1 convolution with P). The merged kernel is
    the same ``(out, in / g, *kernel_size)`` tensor as the base's. Cost: g * r intermediate channels (for a
    depthwise convolution, r per input channel), so large ranks on grouped layers are expensive.

    ``padding_mode`` other than ``"zeros"`` is honoured the way ``nn.ConvNd`` does it (explicit padding, then an
    unpadded convolution), so the adapted layer equals the merged layer for every padding mode.

    Attributes:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode: as in the base
            layer (read by code that inspects conv layers).
    """

    def __init__(
        self,
        module: nn.Module,
        r: int,
        scale: float,
        dropout: float = 0.0,
        start: TripletStart = PAPER_START,
    ) -> None:
        out_channels, d_in = self.dims(module)
        super().__init__(module.weight, out_channels, d_in, r, scale, dropout, start)
        self.weight = module.weight
        self.bias = module.bias
        self.in_channels: int = module.in_channels
        self.out_channels: int = out_channels
        self.kernel_size: tuple[int, ...] = tuple(module.weight.shape[2:])
        self.stride: tuple[int, ...] = tuple(module.stride)
        # "same"/"valid" stay strings, as nn.ConvNd keeps them.
        self.padding: tuple[int, ...] | str = (
            module.padding if isinstance(module.padding, str) else tuple(module.padding)
        )
        self.dilation: tuple[int, ...] = tuple(module.dilation)
        self.groups: int = module.groups
        self.padding_mode: str = module.padding_mode
        self._reversed_padding_repeated_twice: list[int] = list(module._reversed_padding_repeated_twice)

    @classmethod
    def dims(cls, module: nn.Module) -> tuple[int, int]:
        out_channels = module.weight.shape[0]
        return out_channels, module.weight[0].numel()  # in / groups * prod(kernel_size)

    @classmethod
    def layer_type_name(cls, module: nn.Module) -> str:
        return f"nn_conv{module.weight.dim() - 2}d"

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if isinstance(module, SVDAdapter):
            return None
        base = _CONV_TYPES[module.weight.dim() - 2]
        redefined = overrides(module, base, "forward", "_conv_forward")
        if redefined:
            return (
                f"its class {type(module).__name__} redefines {', '.join(redefined)} of nn.{base.__name__}, so an "
                "adapter that computes a plain convolution would change what the layer does"
            )
        return None

    @classmethod
    def from_base(
        cls, module: nn.Module, r: int, scale: float, dropout: float = 0.0, start: TripletStart = PAPER_START
    ) -> SVDConv:
        return cls(module, r, scale, dropout, start)

    def layer_options(self) -> dict[str, Any]:
        return {
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "padding_mode": self.padding_mode,
        }

    @classmethod
    def lora_tensors(
        cls, factors: KeptFactors, weight_shape: Sequence[int], options: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """PEFT's convolution LoRA: ``lora_A`` = Q as k kernels of the base's size, ``lora_B`` = P as a 1 x 1 kernel.

        PEFT's convolution LoRA ignores ``dilation`` and ``padding_mode`` and factorises grouped convolutions
        differently, so layers with ``groups > 1``, a dilation or a non-zero padding mode are refused.

        Raises:
            ValueError: for a layer no PEFT LoRA layer computes.
        """
        problems = []
        if options.get("groups", 1) != 1:
            problems.append(f"groups={options['groups']} (PEFT factorises grouped convolutions differently)")
        if any(d != 1 for d in options.get("dilation", ())):
            problems.append(f"dilation={tuple(options['dilation'])} (PEFT's lora_A ignores it)")
        if options.get("padding_mode", "zeros") != "zeros":
            problems.append(f"padding_mode='{options['padding_mode']}' (PEFT's lora_A pads with zeros)")
        if problems:
            raise ValueError(
                f"{', '.join(problems)}, so no PEFT LoRA layer computes this update. Merge the adapter instead "
                "(adalora.merge / adalora merge), or leave this layer out of target_modules."
            )
        out_channels, *kernel = weight_shape  # kernel = [in / groups, *kernel_size]
        ones = [1] * (len(kernel) - 1)
        return {
            "lora_A.weight": factors.lora_a().view(factors.rank, *kernel),
            "lora_B.weight": factors.P.contiguous().clone().view(out_channels, factors.rank, *ones),
        }

    @property
    def _conv_fn(self) -> Callable[..., torch.Tensor]:
        return _CONV_FNS[len(self.kernel_size)]

    def _conv(self, x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``kernel`` applied as the base layer applies its own (stride, padding and its mode, dilation, groups)."""
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return self._conv_fn(x, kernel, bias, self.stride, 0, self.dilation, self.groups)
        return self._conv_fn(x, kernel, bias, self.stride, self.padding, self.dilation, self.groups)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.weight, self.bias)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_forward(x) + self.adapter_output(x)

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        """conv_1x1(conv(dropout(x), Q), scale * P diag(lambda)), never forming the ``(out, in/g, *k)`` kernel.

        Args:
            x: input of shape ``(N, in_channels, *spatial)`` or unbatched ``(in_channels, *spatial)``.

        Returns:
            Tensor shaped like the base layer's output, in ``x``'s dtype.
        """
        r, ones = self.r, (1,) * len(self.kernel_size)
        kernels = self.Q.view(r, self.in_channels // self.groups, *self.kernel_size)
        if self.groups > 1:
            kernels = kernels.repeat(self.groups, 1, *ones)  # the same r kernels for every channel group
        h = self._conv(self.dropout(x).to(self.Q.dtype), kernels, None)  # (N, groups * r, *out_spatial)
        mix = (self.P * (self.E * self.scale)).view(self.out_channels, r, *ones)  # scale folded into the r-vector
        return self._conv_fn(h, mix, None, 1, 0, 1, self.groups).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update in the base kernel's layout ``(out, in / groups, *kernel_size)`` (for merging only)."""
        return super().delta_weight().view(self.weight.shape)

    def to_base(self, weight: torch.Tensor) -> nn.Module:
        """A plain ``nn.Conv{1,2,3}d`` with this layer's settings holding ``weight`` and this adapter's bias."""
        module = _CONV_TYPES[len(self.kernel_size)](
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device="meta",
        )
        module.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            module.bias = self.bias
        return module

    def extra_repr(self) -> str:
        groups = f", groups={self.groups}" if self.groups > 1 else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}{groups}, "
            f"r={self.r}, scale={self.scale:g}"
        )
