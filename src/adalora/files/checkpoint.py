"""Training checkpoints that survive a crash: atomic writes, trainable state, RNG states.

A checkpoint is one file written atomically (temporary file in the same directory, ``fsync``, then
``os.replace``): a process killed at any instant leaves either the previous checkpoint or the new one,
never a torn file. It holds what an exact continuation needs: the trainable part of the model (adapter
factors, ``rank_mask`` buffers, task head), the optimizer, the LR scheduler, the allocator and the random
number generators, plus whatever small bookkeeping the caller adds.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..layers import SVDAdapter, unwrap_model
from .atomic import atomic_write


# ---------------------------------------------------------------------------------------------- model state
def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The part of ``model.state_dict()`` that training changes.

    That is every parameter with ``requires_grad`` plus everything an adapter owns except the frozen base
    ``weight``/``bias``: its factors even when frozen (a pruned LoRA doublet's gate lambda is frozen but
    masked) and its ``rank_mask`` buffer.
    """
    model = unwrap_model(model)  # the keys of a compiled or DDP model, read as a plain model's
    keep = {name for name, param in model.named_parameters() if param.requires_grad}
    for prefix, module in model.named_modules():
        if isinstance(module, SVDAdapter):
            for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if name not in ("weight", "bias"):
                    keep.add(f"{prefix}.{name}" if prefix else name)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items() if name in keep}


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`trainable_state_dict` output; every saved key must exist in ``model`` and vice versa."""
    model = unwrap_model(model)
    expected = set(trainable_state_dict(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            "checkpoint does not match the model: "
            f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}. "
            "Resume with the same model, method and target modules."
        )
    model.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """States of Python's and torch's generators (CPU, and CUDA when available): dropout, shuffles."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` output."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    allocator: Any | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Atomically save everything needed to continue training exactly.

    Args:
        path: checkpoint file.
        model: the model being trained (only :func:`trainable_state_dict` is stored).
        optimizer: its optimizer.
        scheduler: an LR scheduler with ``state_dict()``, or None.
        allocator: a :class:`~adalora.RankAllocator`, or None.
        extra: small picklable bookkeeping (step counters, metrics so far) returned by :func:`load_checkpoint`.
    """
    state = {
        "model": trainable_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "allocator": None if allocator is None else allocator.state_dict(),
        "rng": rng_state(),
        "extra": extra or {},
    }
    return atomic_write(path, lambda file: torch.save(state, file))


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    allocator: Any | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a :func:`save_checkpoint` file into freshly built objects; returns its ``extra`` dict.

    Raises:
        ValueError: if the file is not a checkpoint or does not fit the model/allocator.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not an adalora checkpoint")
    load_trainable_state_dict(model, state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if allocator is not None:
        if state["allocator"] is None:
            raise ValueError(f"{path} holds no allocator state, but this run has an allocator")
        allocator.load_state_dict(state["allocator"])
    if restore_rng:
        set_rng_state(state["rng"])
    return state["extra"]
