"""Quantize a loaded model's linear layers in place (QLoRA-style bases): what ``adalora train --quantize`` calls.

Works on any model already in memory, including the packaged SmolLM2 GGUF that transformers dequantizes to float32
on load (transformers' ``BitsAndBytesConfig``/``TorchAoConfig`` only apply when loading a checkpoint directory;
models loaded that way are supported by :func:`adalora.inject` as they are). The methods are the quantized kinds of
the layer table (``adalora.layers.registry``: bitsandbytes nf4 with double quantization and blocks of 64, LLM.int8()
with outlier threshold 6, torchao NF4 with blocks of 64, torchao int8 weight-only), each with its conversion.

bitsandbytes and torchao are imported only when asked for (both print warnings at import), quietly.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..layers import QUANTIZATIONS
from .quiet import DropMessages, dropped, quiet_import

METHODS: tuple[str, ...] = tuple(QUANTIZATIONS)  # the layer table's quantized kinds (adalora.layers.registry)


class QuantizationUnavailable(ImportError):
    """The package a quantization method needs is not installed."""


def require_package(method: str) -> None:
    """Import the package ``method`` needs, or raise :class:`QuantizationUnavailable` in one line.

    Raises:
        ValueError: if ``method`` is not one of :data:`METHODS`.
        QuantizationUnavailable: if its package is missing.
    """
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}.")
    package = QUANTIZATIONS[method].package
    try:
        with _without_hub_kernels() if package == "bitsandbytes" else contextlib.nullcontext():
            quiet_import(package)
    except ImportError as error:
        raise QuantizationUnavailable(
            f"--quantize {method} needs {package}, which is not installed: pip install 'adalora[quant]'"
        ) from error


@contextlib.contextmanager
def _without_hub_kernels() -> Iterator[None]:
    """Importing bitsandbytes without its attempt to fetch a CPU kernel from the Hugging Face Hub.

    On a CPU with AVX512-BF16, ``import bitsandbytes`` asks the ``kernels`` package for a kernel of
    "kernels-community" (a network request at every run, or a warning offline) to speed up the inference path that
    :func:`adalora.layers.keep_differentiable_layout` keeps 4-bit layers off. ``kernels`` is hidden for the import
    (a ``None`` in ``sys.modules`` makes importing it fail), and bitsandbytes' report that it fell back to its own
    kernel is dropped.
    """
    hidden = sys.modules.get("kernels")
    sys.modules["kernels"] = None  # type: ignore[assignment]
    try:
        with dropped("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"):
            yield
    finally:
        if hidden is None:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = hidden


# bitsandbytes logs this at every eval-mode forward of an 8-bit layer on float32 or bfloat16 inputs: LLM.int8()
# quantizes the activations from float16 (docs/layer-types.md says so), and a run evaluates batch after batch.
_INT8_CAST_NOTICE = DropMessages("MatMul8bitLt: inputs will be cast")


def drop_int8_cast_notices() -> None:
    """From now on, in this process, drop bitsandbytes' notice that an 8-bit layer casts its inputs to float16."""
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_INT8_CAST_NOTICE)  # added once however often


def quantize_model(
    model: nn.Module,
    method: str,
    *,
    compute_dtype: torch.dtype | None = None,
    skip: Iterable[str] = (),
) -> list[str]:
    """Replace ``model``'s ``nn.Linear`` layers by quantized ones, in place, on the device each layer is on.

    Left in floating point: the output embedding (``lm_head``: it is usually tied to the input embedding and is
    the most sensitive layer), any layer whose weight another module shares, layers whose names end with an entry
    of ``skip`` (e.g. a classification head that trains), and layers the method's kernels cannot hold (its
    entry's ``accepts``: ``torchao-nf4`` needs whole blocks of 64 weights, ``bnb-4bit`` at least 64 inputs).
    ``nn.Linear`` subclasses are left alone.

    Args:
        model: a float model (e.g. ``AutoModelForCausalLM.from_pretrained(...)``).
        method: one of :data:`METHODS`.
        compute_dtype: the dtype ``bnb-4bit`` layers compute in (default: each weight's dtype); ignored otherwise.
        skip: module-name suffixes to keep in floating point.

    Returns:
        The names of the layers that were quantized.

    Raises:
        ValueError: unknown ``method``, or nothing to quantize.
        QuantizationUnavailable: the method's package is missing (the message says what to install).
    """
    require_package(method)
    quantization = QUANTIZATIONS[method]
    skip = tuple(skip)
    keep = _tied_or_output_weights(model)
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and id(module.weight) not in keep
        and not any(name == s or name.endswith("." + s) for s in skip)
        and quantization.accepts(module)
    ]
    if not chosen:
        raise ValueError(f"quantize_model: the model has no nn.Linear layer to quantize with {method}.")
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantization.convert(module, compute_dtype))
    return [name for name, _ in chosen]


def _tied_or_output_weights(model: nn.Module) -> set[int]:
    """Ids of weights to keep in floating point: the output embedding's and any weight two modules share."""
    seen: dict[int, int] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            seen[id(weight)] = seen.get(id(weight), 0) + 1
    keep = {k for k, n in seen.items() if n > 1}
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is not None and isinstance(getattr(output, "weight", None), torch.Tensor):
        keep.add(id(output.weight))
    return keep
