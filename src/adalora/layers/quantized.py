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

Neither bitsandbytes nor torchao is imported here: both print warnings at import, and a model that holds their
layers has imported them already, so the checks look them up in ``sys.modules``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import SVDAdapter
from .linear import SVDLinear

SUPPORTED_QUANTIZED = (
    "bitsandbytes Linear4bit (nf4/fp4) and Linear8bitLt, torchao NF4 and int8 weight-only weights on nn.Linear"
)


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


def is_torchao_linear(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` (not a subclass) holding a supported torchao weight."""
    return type(module) is nn.Linear and torchao_kind(module.weight) in ("torchao-nf4", "torchao-int8")


def precision_of(tensor: torch.Tensor) -> str:
    """How a base parameter is stored: its dtype (``"float32"``) or its quantization (``"bnb-nf4"``, ...)."""
    kind = torchao_kind(tensor)
    if kind is not None:
        return kind
    cls = type(tensor).__name__
    if cls == "Params4bit" and type(tensor).__module__.startswith("bitsandbytes"):
        state = getattr(tensor, "quant_state", None)
        if state is None:
            return str(tensor.dtype).removeprefix("torch.")  # not quantized yet
        packed = getattr(state, "packing_format_for_cpu", False)  # see keep_differentiable_layout
        nested = getattr(state, "original_nested", state.nested) if packed else state.nested
        return f"bnb-{state.quant_type}" + ("-dq" if nested else "")
    if cls == "Int8Params" and tensor.dtype == torch.int8:
        return "bnb-int8"
    return str(tensor.dtype).removeprefix("torch.")


def logical_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape a parameter has unquantized: a packed bitsandbytes 4-bit weight reports its storage shape."""
    state = getattr(tensor, "quant_state", None)
    if type(tensor).__name__ == "Params4bit" and state is not None:
        return tuple(state.shape)
    return tuple(tensor.shape)


# ---------------------------------------------------------------------- adapters holding the quantized layer
class _QuantizedLayerAdapter(SVDAdapter):
    """An adapter that holds a quantized layer as ``base_layer`` and calls its forward.

    The layer's ``weight``/``bias`` are read through it, and the adapter's state-dict keys are the layer's own
    (``q_proj.weight``, ``q_proj.weight.absmax``, ...), not ``q_proj.base_layer.weight``, so ``model.state_dict()``
    keeps the base model's keys, as for every other adapter.
    """

    layer_type = "linear"  # files from a quantized base load onto the unquantized model and vice versa
    base_layer: nn.Module

    @classmethod
    def dims(cls, module: nn.Module) -> tuple[int, int]:
        if isinstance(module, SVDAdapter):
            return module.d_out, module.d_in
        return module.out_features, module.in_features

    @classmethod
    def from_base(
        cls, module: nn.Module, r: int, scale: float, dropout: float = 0.0, init_std: float = 0.02
    ) -> _QuantizedLayerAdapter:
        d_out, d_in = cls.dims(module)
        # P and Q are float32 (the packed weight's integer dtype says nothing about precision); see SVDAdapter.
        return cls(module.weight, None, d_out, d_in, r, scale, dropout, init_std, base_layer=module)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._register_state_dict_hook(_flatten_base_layer_keys)
        self.register_load_state_dict_pre_hook(_nest_base_layer_keys)

    @property
    def weight(self) -> nn.Parameter:  # type: ignore[override]
        return self.base_layer.weight

    @property
    def bias(self) -> nn.Parameter | None:  # type: ignore[override]
        return self.base_layer.bias

    def base_shape(self) -> tuple[int, ...]:
        return (self.d_out, self.d_in)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)

    def unloaded(self) -> nn.Module:
        return self.base_layer

    def to_base(self, weight: torch.Tensor) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``weight`` ``(d_out, d_in)`` (dequantized, merged) and the layer's bias."""
        module = nn.Linear(self.d_in, self.d_out, bias=self.bias is not None, device="meta")
        module.weight = nn.Parameter(weight, requires_grad=False)
        bias = self.bias
        if bias is not None:
            # bitsandbytes keeps the bias in its compute dtype, which may not be the dequantized weight's.
            same = bias.dtype == weight.dtype
            module.bias = bias if same else nn.Parameter(bias.detach().to(weight.dtype), bias.requires_grad)
        return module

    def requantized(self, weight: torch.Tensor) -> nn.Module:
        """A layer of the base's quantized kind holding ``weight`` (merged) quantized again."""
        raise NotImplementedError


def _flatten_base_layer_keys(module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    nested = prefix + "base_layer."
    for key in [k for k in state if k.startswith(nested)]:
        state[prefix + key[len(nested) :]] = state.pop(key)


def _nest_base_layer_keys(module: nn.Module, state: dict[str, Any], prefix: str, *_args: Any) -> None:
    own = {prefix + name for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]}
    nested = prefix + "base_layer."
    for key in [k for k in state if k.startswith(prefix) and k not in own and not k.startswith(nested)]:
        state[nested + key[len(prefix) :]] = state.pop(key)


class SVDLinear4bit(_QuantizedLayerAdapter):
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

    def dense_weight(self) -> torch.Tensor:
        """The dequantized weight ``(d_out, d_in)`` in the dtype it was quantized from."""
        import bitsandbytes.functional as bnbf

        state = self.weight.quant_state  # in the standard layout: see keep_differentiable_layout
        return bnbf.dequantize_4bit(self.weight.data, state).to(state.dtype)

    def requantized(self, weight: torch.Tensor) -> nn.Module:
        import bitsandbytes as bnb

        base = self.base_layer
        state = self.weight.quant_state
        module = bnb.nn.Linear4bit(
            self.d_in,
            self.d_out,
            bias=self.bias is not None,
            compute_dtype=base.compute_dtype,
            compress_statistics=bool(state.nested),
            quant_type=state.quant_type,
            quant_storage=self.weight.quant_storage,
            device="cpu",
        )
        module.weight = bnb.nn.Params4bit(
            weight.detach().to("cpu"),
            requires_grad=False,
            blocksize=state.blocksize,
            compress_statistics=bool(state.nested),
            quant_type=state.quant_type,
            quant_storage=self.weight.quant_storage,
        )
        if self.bias is not None:
            module.bias = self.bias
        return module.to(weight.device)  # bitsandbytes quantizes on the move


class SVDLinear8bitLt(_QuantizedLayerAdapter):
    """Adapter for bitsandbytes ``Linear8bitLt`` with int8 weights: the base computes with LLM.int8()."""

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if module.weight.dtype != torch.int8:
            return (
                "its weight is not int8 (a Linear8bitLt with has_fp16_weights=True, or not yet moved to a device, "
                "trains its own float weights): load it with has_fp16_weights=False and move it to a device"
            )
        return None

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
        import bitsandbytes as bnb

        base = self.base_layer
        module = bnb.nn.Linear8bitLt(
            self.d_in,
            self.d_out,
            bias=self.bias is not None,
            has_fp16_weights=False,
            threshold=base.state.threshold,
            device="cpu",
        )
        module.weight = bnb.nn.Int8Params(weight.detach().to("cpu"), requires_grad=False, has_fp16_weights=False)
        if self.bias is not None:
            module.bias = self.bias
        return module.to(weight.device)


class SVDTorchAOLinear(SVDLinear):
    """Adapter for an ``nn.Linear`` whose weight is a torchao NF4 or int8 weight-only tensor.

    The layer is a plain ``nn.Linear``; torchao's tensor subclass dispatches ``F.linear`` to its own kernel, so
    :class:`SVDLinear`'s forward is the quantized layer's forward. Only merging differs: the weight is dequantized.
    """

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        return None  # is_torchao_linear matched only plain nn.Linear layers with a supported weight

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
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(module, Int8WeightOnlyConfig())
        module.weight.requires_grad_(False)
        return module

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def is_quantized_adapter(adapter: nn.Module) -> bool:
    """Whether ``adapter`` adapts a quantized base layer (so ``merge`` dequantizes, or requantizes on request)."""
    return isinstance(adapter, _QuantizedLayerAdapter | SVDTorchAOLinear)
