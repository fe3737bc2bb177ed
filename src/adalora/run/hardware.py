"""Where and in what precision a run computes: ``--device`` and ``--precision``.

- The device: ``auto`` is the GPU when there is one (CUDA, else Apple's MPS), else the CPU. It is resolved once
  when a run starts and saved in ``run.json`` (like the thread count), so that ``--resume`` continues where the
  run began, and a device that is not there is refused in one line.
- The precision: ``bf16`` and ``fp16`` run the forward pass under :func:`torch.autocast`, so the base model's
  matrix products are computed in 16 bits; every parameter (adapters, head), the importance statistics and the
  optimizer state stay float32. ``fp16`` also scales the loss (:class:`torch.amp.GradScaler`) so that small
  gradients do not underflow; a step whose gradients overflow is skipped by the scaler, and the allocator treats
  its non-finite gradients as it always does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..integrations.loop import model_loss
from .settings import DEVICE, RunError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # the keys are settings.Precision


def resolve_device(name: str) -> str:
    """The concrete device of ``--device name`` (``auto`` -> ``cuda``, ``mps`` or ``cpu``).

    Raises:
        RunError: for a device that this machine does not have, or a name that is no device.
    """
    if DEVICE.problem(name) is not None:
        raise RunError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            have = f"{count} CUDA device{'' if count == 1 else 's'}" if count else "no CUDA device"
            raise RunError(f"--device {name}: this machine has {have}; use --device cpu or --device auto")
    if name == "mps" and not _mps_available():
        raise RunError("--device mps: Apple's MPS backend is not available here; use --device cpu or --device auto")
    return name


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The context the forward pass runs in: :func:`torch.autocast` to ``precision`` (nothing for fp32)."""
    dtype = DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(device: str, precision: str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 (None otherwise: bf16 has float32's exponent range and needs none)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def to_device(batch: Mapping[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """The tensors of ``batch`` on ``device`` (a no-op on the CPU)."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


class DeviceLoss:
    """``fit``'s ``loss_fn``: moves a batch to the device and computes its loss under autocast.

    A class (not a closure) so that its settings can be read back in tests.

    Args:
        loss: ``(model, batch) -> scalar``; default ``model(**batch).loss``
            (:func:`adalora.integrations.loop.model_loss`).
    """

    def __init__(self, device: str, precision: str, loss: Callable[[nn.Module, Any], torch.Tensor] | None = None):
        self.device, self.precision, self.loss = device, precision, loss

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return (self.loss or model_loss)(model, to_device(batch, self.device)).float()
