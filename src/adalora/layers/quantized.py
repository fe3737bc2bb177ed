"""Adapters for quantized linear layers (QLoRA-style AdaLoRA): the base computes in its quantized form, the
adapter in float32.

Supported bases, all of logical shape ``(out_features, in_features)`` whatever their storage:

- bitsandbytes ``Linear4bit`` (nf4 or fp4, with or without double quantization; ``LinearNF4``/``LinearFP4``):
  the weight is stored packed, two 4-bit codes a byte, as a ``(out * in / 2, 1)`` uint8 tensor;
- bitsandbytes ``Linear8bitLt`` with int8 weights (``has_fp16_weights=False``, what ``load_in_8bit`` gives);
- a plain ``nn.Linear`` whose weight is a torchao ``NF4Tensor`` (``to_nf4``) or an int8 weight-only ``Int8Tensor``
  (``quantize_(model, Int8WeightOnlyConfig())``, also what transformers' ``TorchAoConfig`` produces).

Each adapter runs the quantized layer's own forward as the base computation, so at lambda = 0 the adapted model
computes exactly what the quantized model computes, and gradients reach the input (and P, lambda, Q) but never the
quantized weight. The gradient with respect to the input is the dequantized layer's, ``g @ W``: bitsandbytes'
and torchao's autograd functions multiply by the dequantized weight. One bitsandbytes path has no backward (its CPU
inference kernel for 4-bit weights, see :func:`keep_differentiable_layout`), and :func:`adalora.inject` keeps
every 4-bit layer of the model off it. The adapters record the layer type ``"linear"``: an adapter trained on a
4-bit base loads onto the same model in float32 or bfloat16 and vice versa.

Each kind is one entry of the layer table (``layers.registry``) with its :class:`Quantization`: how
``adalora train --quantize`` makes such a layer from an ``nn.Linear``. Neither bitsandbytes nor torchao is
imported at module level: both print warnings at import, and a model that holds their layers has imported them
already, so the checks look them up in ``sys.modules``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import PAPER_START, SVDAdapter, TripletStart
from .linear import plain_linear


@dataclass(frozen=True)
class Quantization:
    """How ``adalora train --quantize METHOD`` makes a quantized layer of one kind from a float ``nn.Linear``.

    Attributes:
        method: the ``--quantize`` name (``"bnb-4bit"``).
        package: the package it needs (imported only when asked for).
        accepts: whether a layer can be quantized this way (block sizes the kernels need).
        convert: ``convert(linear, compute_dtype)`` -> the quantized layer, on the linear layer's device.
    """

    method: str
    package: str
    accepts: Callable[[nn.Linear], bool]
    convert: Callable[[nn.Linear, torch.dtype | None], nn.Module]


# ---------------------------------------------------------------------- recognising quantized layers and weights
def _bnb_class(name: str) -> type | None:
    """A class of ``bitsandbytes.nn`` if bitsandbytes is loaded (never imports it)."""
    module = sys.modules.get("bitsandbytes.nn")
    return getattr(module, name, None)


def is_bnb_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (``LinearNF4``/``LinearFP4`` included)."""
    cls = _bnb_class("Linear4bit")
    return cls is not None and isinstance(module, cls)


def is_bnb_8bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear8bitLt``."""
    cls = _bnb_class("Linear8bitLt")
    return cls is not None and isinstance(module, cls)


def torchao_kind(weight: Any) -> str | None:
    """``"torchao-nf4"``/``"torchao-int8"`` for the supported torchao weights, ``"torchao <Type>"`` for another
    torchao tensor subclass, None for anything that is not a torchao tensor."""
    cls = type(weight)
    if not cls.__module__.startswith("torchao."):
        return None
    if cls.__name__ == "NF4Tensor":
        return "torchao-nf4"
    if cls.__name__ == "Int8Tensor" and getattr(weight, "act_quant_kwargs", None) is None:
        return "torchao-int8"  # weight-only: the activations stay in floating point
    return f"torchao {cls.__name__}"


def keep_differentiable_layout(model: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer of ``model`` in the weight layout whose product has a backward.

    On a CPU with AVX512-BF16, ``Linear4bit.forward`` repacks its weight, the first time it runs in eval mode on an
    input without gradients, for an inference kernel (``gemv_4bit``) that has no autograd formula, and keeps using
    that kernel afterwards, in training mode too. From then on the layer passes no gradient to its input (exactly 0),
    so every adapter below it would learn from wrong gradients after the first evaluation. Here each 4-bit layer
    is switched off that kernel (``support_avx512bf16_for_cpu``, the flag its forward checks) and a layer repacked
    already is put back in the standard layout, which bitsandbytes' ``MatMul4Bit`` differentiates with
    ``g @ dequantize_4bit(W)``. Every 4-bit layer, adapted or not: gradients pass through the frozen ones too.
    Evaluation then uses the same product as training. On CUDA the flag is never read (the repacking is CPU-only).

    Returns:
        The number of layers that had been repacked and were put back.
    """
    unpacked = 0
    for module in model.modules():
        if is_bnb_4bit(module):
            module.support_avx512bf16_for_cpu = False
            if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
                _unpack_cpu_layout(module.weight)
                unpacked += 1
    return unpacked


def _unpack_cpu_layout(weight: Any) -> None:
    """Put a 4-bit weight that bitsandbytes repacked for its CPU kernel back in the standard layout, in place.

    The repacking rounded the block scales to bfloat16 (for good) and stored them transposed, ``(in / blocksize,
    out)``. bitsandbytes' inverse restores the codes, and re-quantizes the scales in the standard order when the
    weight was double-quantized; otherwise it leaves them transposed, so they are reordered here.
    """
    import bitsandbytes.functional as bnbf

    state = weight.quant_state
    scales = state.absmax.T.reshape(-1).float()  # (out * in / blocksize,), the standard order
    weight.data, state = bnbf._convert_weight_packed_for_cpu_inverse(weight.data, state)
    if not state.nested:
        state.absmax = scales


def torchao_linear(kind: str) -> Callable[[nn.Module], bool]:
    """A test for an ``nn.Linear`` (not a subclass) holding a torchao weight of ``kind`` (:func:`torchao_kind`)."""
    return lambda module: type(module) is nn.Linear and torchao_kind(module.weight) == kind


def dtype_name(tensor: torch.Tensor) -> str:
    """``"float32"``, ``"bfloat16"``, ...: how a plain tensor is stored."""
    return str(tensor.dtype).removeprefix("torch.")


def is_quantized_precision(kind: str) -> bool:
    """Whether a :func:`precision_of` kind names a quantized storage (``"bnb-nf4"``) rather than a dtype."""
    return not isinstance(getattr(torch, kind, None), torch.dtype)


def logical_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape a parameter has unquantized and whole: a packed bitsandbytes 4-bit weight reports its storage shape,
    a weight partitioned by DeepSpeed ZeRO-3 its local shape (the whole one is ``ds_shape``)."""
    if hasattr(tensor, "ds_shape"):
        return tuple(tensor.ds_shape)
    state = getattr(tensor, "quant_state", None)
    if type(tensor).__name__ == "Params4bit" and state is not None:
        return tuple(state.shape)
    return tuple(tensor.shape)


# ---------------------------------------------------------------------- adapters of quantized layers
class QuantizedAdapter(SVDAdapter):
    """An adapter whose frozen base is quantized: merging dequantizes it (or quantizes the merged weight again)."""

    layer_type = "linear"  # files from a quantized base load onto the unquantized model and vice versa

    def base_shape(self) -> tuple[int, ...]:
        return (self.d_out, self.d_in)  # the logical shape: the storage may be packed

    @classmethod
    def storage_kind(cls, tensor: torch.Tensor) -> str | None:
        """How ``tensor`` is stored if it is a weight of this kind (``"bnb-nf4-dq"``), else None; what adapter
        fingerprints record (a float adapter loads onto a quantized base, with a warning that says so)."""
        raise NotImplementedError(f"{cls.__name__} must define storage_kind")

    def dense_weight(self) -> torch.Tensor:
        """The dequantized weight ``(d_out, d_in)``, in the dtype the layer computes in."""
        raise NotImplementedError(f"{type(self).__name__} must define dense_weight")

    def to_base(self, weight: torch.Tensor) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``weight`` ``(d_out, d_in)`` (dequantized, merged) and the layer's bias."""
        return plain_linear(weight, self.bias)

    def requantized(self, weight: torch.Tensor) -> nn.Module:
        """A layer of the base's quantized kind holding ``weight`` (merged) quantized again."""
        raise NotImplementedError(f"{type(self).__name__} must define requantized")


class _LayerHoldingAdapter(QuantizedAdapter):
    """A quantized adapter that holds the quantized layer whole as ``base_layer`` and calls its forward.

    The layer's ``weight``/``bias`` are read through it, and the adapter's state-dict keys are the layer's own
    (``q_proj.weight``, ``q_proj.weight.absmax``, ...), not ``q_proj.base_layer.weight``, so ``model.state_dict()``
    keeps the base model's keys, as for every other adapter.
    """

    base_layer: nn.Module

    def __init__(self, layer: nn.Module, r: int, scale: float, dropout: float = 0.0, start: TripletStart = PAPER_START):
        # P and Q are float32 (the packed weight's integer dtype says nothing about precision); see SVDAdapter.
        super().__init__(layer.weight, layer.out_features, layer.in_features, r, scale, dropout, start)
        self.base_layer = layer
        self._register_state_dict_hook(_flatten_base_layer_keys)
        self.register_load_state_dict_pre_hook(_nest_base_layer_keys)

    @classmethod
    def dims(cls, module: nn.Module) -> tuple[int, int]:
        return module.out_features, module.in_features

    @classmethod
    def from_base(
        cls, module: nn.Module, r: int, scale: float, dropout: float = 0.0, start: TripletStart = PAPER_START
    ):
        return cls(module, r, scale, dropout, start)

    @property
    def weight(self) -> nn.Parameter:  # type: ignore[override]
        return self.base_layer.weight

    @property
    def bias(self) -> nn.Parameter | None:  # type: ignore[override]
        return self.base_layer.bias

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)

    def unloaded(self) -> nn.Module:
        return self.base_layer

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, r={self.r}, scale={self.scale:g}"


def _flatten_base_layer_keys(module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    nested = prefix + "base_layer."
    for key in [k for k in state if k.startswith(nested)]:
        state[prefix + key[len(nested) :]] = state.pop(key)


def _nest_base_layer_keys(module: nn.Module, state: dict[str, Any], prefix: str, *_args: Any) -> None:
    own = {prefix + name for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]}
    nested = prefix + "base_layer."
    for key in [k for k in state if k.startswith(prefix) and k not in own and not k.startswith(nested)]:
        state[nested + key[len(prefix) :]] = state.pop(key)


def _copy_bias(linear: nn.Module, module: nn.Module) -> None:
    """The float layer's bias, frozen, on the CPU (where bitsandbytes builds its layers before moving them)."""
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().cpu(), requires_grad=False)


class SVDLinear4bit(_LayerHoldingAdapter):
    """Adapter for bitsandbytes ``Linear4bit`` (nf4/fp4, optionally double-quantized): P ``(out, r)``, Q
    ``(r, in)`` of the logical shape; the base computes with bitsandbytes' 4-bit matmul in its compute dtype."""

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if getattr(module.weight, "quant_state", None) is None:
            return (
                "its weight is not quantized yet (bitsandbytes quantizes a Linear4bit when it is moved to a "
                "device): call model.to(device) before adalora.inject"
            )
        return None

    @staticmethod
    def quantize(linear: nn.Linear, compute_dtype: torch.dtype | None) -> nn.Module:
        """nf4 with double quantization (QLoRA's choice), blocks of 64, computing in ``compute_dtype``."""
        import bitsandbytes as bnb

        weight = linear.weight.detach()
        options = {"compress_statistics": True, "quant_type": "nf4"}
        module = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=compute_dtype or weight.dtype, device="cpu", **options,
        )  # fmt: skip
        module.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, blocksize=64, **options)
        _copy_bias(linear, module)
        return module.to(weight.device)  # bitsandbytes quantizes when the layer is moved to its device

    @classmethod
    def storage_kind(cls, tensor: torch.Tensor) -> str | None:
        if type(tensor).__name__ != "Params4bit" or not type(tensor).__module__.startswith("bitsandbytes"):
            return None
        state = getattr(tensor, "quant_state", None)
        if state is None:
            return dtype_name(tensor)  # not quantized yet
        packed = getattr(state, "packing_format_for_cpu", False)  # see keep_differentiable_layout
        nested = getattr(state, "original_nested", state.nested) if packed else state.nested
        return f"bnb-{state.quant_type}" + ("-dq" if nested else "")

    def dense_weight(self) -> torch.Tensor:
        """The dequantized weight ``(d_out, d_in)`` in the dtype it was quantized from."""
        import bitsandbytes.functional as bnbf

        state = self.weight.quant_state  # in the standard layout: see keep_differentiable_layout
        return bnbf.dequantize_4bit(self.weight.data, state).to(state.dtype)

    def requantized(self, weight: torch.Tensor) -> nn.Module:
        import bitsandbytes as bnb

        state = self.weight.quant_state
        options = {
            "compress_statistics": bool(state.nested),
            "quant_type": state.quant_type,
            "quant_storage": self.weight.quant_storage,
        }
        module = bnb.nn.Linear4bit(
            self.d_in, self.d_out, bias=self.bias is not None, compute_dtype=self.base_layer.compute_dtype,
            device="cpu", **options,
        )  # fmt: skip
        module.weight = bnb.nn.Params4bit(
            weight.detach().to("cpu"), requires_grad=False, blocksize=state.blocksize, **options
        )
        if self.bias is not None:
            module.bias = self.bias
        return module.to(weight.device)  # bitsandbytes quantizes on the move


class SVDLinear8bitLt(_LayerHoldingAdapter):
    """Adapter for bitsandbytes ``Linear8bitLt`` with int8 weights: the base computes with LLM.int8()."""

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if module.weight.dtype != torch.int8:
            return (
                "its weight is not int8 (a Linear8bitLt with has_fp16_weights=True, or not yet moved to a device, "
                "trains its own float weights): load it with has_fp16_weights=False and move it to a device"
            )
        return None

    @staticmethod
    def quantize(linear: nn.Linear, compute_dtype: torch.dtype | None = None, threshold: float = 6.0) -> nn.Module:
        """LLM.int8() with int8 weights and the paper's outlier threshold 6 (``compute_dtype`` is not used)."""
        import bitsandbytes as bnb

        weight = linear.weight.detach()
        module = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False,
            threshold=threshold, device="cpu",
        )  # fmt: skip
        module.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
        _copy_bias(linear, module)
        return module.to(weight.device)

    @classmethod
    def storage_kind(cls, tensor: torch.Tensor) -> str | None:
        return "bnb-int8" if type(tensor).__name__ == "Int8Params" and tensor.dtype == torch.int8 else None

    def _row_scales(self) -> torch.Tensor:
        # The layer moves its weight's row scales into its matmul state at the first forward.
        scb = getattr(self.weight, "SCB", None)
        return scb if scb is not None else self.base_layer.state.SCB

    def dense_weight(self) -> torch.Tensor:
        """The dequantized weight ``W = CB * (SCB * (1/127))`` ``(d_out, d_in)``, in the bias' dtype (float32 without).

        Rounded as bitsandbytes rounds it: its float forward on the CPU and both its backwards multiply by it."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        scales = self._row_scales().float().unsqueeze(1).mul(1.0 / 127.0)
        return self.weight.data.float().mul_(scales).to(dtype)

    def requantized(self, weight: torch.Tensor) -> nn.Module:
        module = self.quantize(plain_linear(weight.detach(), self.bias), threshold=self.base_layer.state.threshold)
        if self.bias is not None:
            module.bias = self.bias
        return module


class SVDTorchAOLinear(QuantizedAdapter):
    """Adapter for an ``nn.Linear`` whose weight is a torchao NF4 or int8 weight-only tensor.

    The layer is a plain ``nn.Linear`` and the adapter owns its weight, as :class:`~adalora.layers.SVDLinear` does;
    torchao's tensor subclass dispatches ``F.linear`` to its own kernel, so the base computes as the quantized
    layer does. Only merging differs: the weight is dequantized.
    """

    def __init__(
        self, module: nn.Linear, r: int, scale: float, dropout: float = 0.0, start: TripletStart = PAPER_START
    ):
        super().__init__(module.weight, module.out_features, module.in_features, r, scale, dropout, start)
        self.weight = module.weight
        self.bias = module.bias

    @classmethod
    def from_base(
        cls, module: nn.Module, r: int, scale: float, dropout: float = 0.0, start: TripletStart = PAPER_START
    ):
        return cls(module, r, scale, dropout, start)  # type: ignore[arg-type]

    @staticmethod
    def quantize_nf4(linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> nn.Module:
        """The weight becomes a torchao ``NF4Tensor`` (blocks of 64), in place."""
        from torchao.quantization import to_nf4

        weight = linear.weight.detach()
        blocks = weight.numel() // 64
        # torchao quantizes the 64-weight blocks' scales again in groups; the largest power of two <= 256 that
        # divides the number of blocks.
        scaler_block = next(s for s in (256, 128, 64, 32, 16, 8, 4, 2, 1) if blocks % s == 0)
        linear.weight = nn.Parameter(to_nf4(weight, 64, scaler_block), requires_grad=False)
        return linear

    @staticmethod
    def quantize_int8(linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> nn.Module:
        """torchao int8 weight-only quantization (one scale per output row), in place."""
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(linear, Int8WeightOnlyConfig())
        linear.weight.requires_grad_(False)
        return linear

    @classmethod
    def storage_kind(cls, tensor: torch.Tensor) -> str | None:
        return torchao_kind(tensor)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        weight = self.weight
        if torchao_kind(weight) == "torchao-nf4":
            return weight.get_original_weight().to(weight.dtype)
        return weight.dequantize()

    def requantized(self, weight: torch.Tensor) -> nn.Module:
        module = self.to_base(weight)
        if torchao_kind(self.weight) == "torchao-nf4":
            from torchao.quantization import to_nf4

            nf4 = to_nf4(weight, self.weight.block_size, self.weight.scaler_block_size)
            module.weight = nn.Parameter(nf4, requires_grad=False)
            return module
        return self.quantize_int8(module)
