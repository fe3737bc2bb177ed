"""Training checkpoints that survive a crash and prove what they are: atomic writes, a SHA-256 of the whole
state, the run they belong to, and the previous checkpoint kept beside the newest.

A checkpoint is one file written atomically (temporary file in the same directory, ``fsync``, then
``os.replace``): a process killed at any instant leaves either the previous checkpoint or the new one,
never a torn file. It holds what an exact continuation needs: the trainable part of the model (adapter
factors, ``rank_mask`` buffers, task head), the optimizer, the LR scheduler, the allocator and the random
number generators, plus whatever small bookkeeping the caller adds.

Loading checks before it changes anything: the file reads with ``weights_only=True`` (never otherwise), its
format version is this one, its state has the SHA-256 written with it (:func:`state_digest`: a flipped byte in
any tensor or number is caught), it belongs to the caller's run (``run_id``), and its trainable tensors have the
model's names and shapes. A damaged newest checkpoint falls back to the previous one
(:func:`load_latest_checkpoint`); anything else is refused with a one-line :class:`CheckpointError`.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
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


def trainable_state_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """None if ``state`` has exactly the names and shapes of ``model``'s :func:`trainable_state_dict`, else what
    differs, in a few words (another method, rank or set of target modules changes them)."""
    expected = {name: tuple(tensor.shape) for name, tensor in trainable_state_dict(model).items()}
    if set(state) != set(expected):
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        return (
            f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}"
        )
    reshaped = [name for name, shape in expected.items() if tuple(state[name].shape) != shape]
    if reshaped:
        first = reshaped[0]
        return (
            f"{len(reshaped)} tensors have other shapes, e.g. '{first}' {list(state[first].shape)} where the model "
            f"has {list(expected[first])}"
        )
    return None


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`trainable_state_dict` output; every saved key must exist in ``model`` with the same shape,
    and vice versa (:func:`trainable_state_mismatch`)."""
    model = unwrap_model(model)
    mismatch = trainable_state_mismatch(model, state)
    if mismatch:
        raise ValueError(
            f"checkpoint does not match the model: {mismatch}. Resume with the same model, method, ranks and "
            "target modules."
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


# ---------------------------------------------------------------------------------------------- digest
def state_digest(state: Any) -> str:
    """SHA-256 of a checkpoint's state: every tensor's dtype, shape and bytes and every other value, in order.

    Computed from the objects rather than the file because ``torch.save`` archives are not byte-for-byte
    reproducible, and because what must not change is what gets loaded. Handles what ``torch.load(...,
    weights_only=True)`` can return: dicts, lists, tuples, strings, numbers, bools, None, bytes, tensors.

    Raises:
        TypeError: for any other type.
    """
    digest = hashlib.sha256()
    _feed(digest, state)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    # Each value is written as a type tag and a length or fixed-size encoding, so that no two different
    # structures give the same byte stream.
    if value is None:
        digest.update(b"N")
    elif isinstance(value, bool):
        digest.update(b"B1" if value else b"B0")
    elif isinstance(value, int):
        text = str(value).encode()
        digest.update(b"I" + struct.pack("<Q", len(text)) + text)
    elif isinstance(value, float):
        digest.update(b"F" + struct.pack("<d", value))
    elif isinstance(value, (str, bytes)):
        data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
        digest.update((b"S" if isinstance(value, str) else b"Y") + struct.pack("<Q", len(data)) + data)
    elif isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").contiguous()
        header = f"{tensor.dtype}{list(tensor.shape)}".encode()
        digest.update(b"T" + struct.pack("<Q", len(header)) + header)
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        digest.update(b"D" + struct.pack("<Q", len(value)))
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update((b"L" if isinstance(value, list) else b"U") + struct.pack("<Q", len(value)))
        for item in value:
            _feed(digest, item)
    elif isinstance(value, (torch.dtype, torch.device)):
        _feed(digest, str(value))
    else:
        raise TypeError(f"state_digest: cannot digest a {type(value).__name__}")


# ---------------------------------------------------------------------------------------------- checkpoints
FORMAT = "adalora-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed, in one line.

    Attributes:
        damaged: the file itself is bad (unreadable, torn, not a checkpoint, or failing its SHA-256 check), as a
            crash or a failing disk leaves it: the previous checkpoint may stand in for it. False for a sound
            file that belongs elsewhere (another run, another model, another format version): never replaced.
    """

    def __init__(self, message: str, *, damaged: bool = False) -> None:
        super().__init__(message)
        self.damaged = damaged


def previous_checkpoint(path: str | Path) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint before ``path`` (``checkpoint.pt`` ->
    ``checkpoint.prev.pt``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    allocator: Any | None = None,
    extra: dict[str, Any] | None = None,
    run_id: str | None = None,
) -> Path:
    """Atomically save everything needed to continue training exactly, keeping the previous checkpoint.

    The file holds the state, the run id and their SHA-256 (:func:`state_digest`), checked on load:
    ``torch.load`` does not check its archive's CRCs, so without it flipped bytes would load as weights. An
    existing ``path`` is first renamed to :func:`previous_checkpoint` (replacing the one before), so that a
    damaged newest checkpoint can be replaced by the previous one; a process killed while writing leaves the
    previous one under that name.

    Args:
        path: checkpoint file.
        model: the model being trained (only :func:`trainable_state_dict` is stored).
        optimizer: its optimizer.
        scheduler: an LR scheduler with ``state_dict()``, or None.
        allocator: a :class:`~adalora.RankAllocator`, or None.
        extra: small picklable bookkeeping (step counters, metrics so far) returned by :func:`load_checkpoint`.
        run_id: the run the checkpoint belongs to; :func:`load_checkpoint` given another one refuses it.
    """
    path = Path(path)
    state = {
        "model": trainable_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "allocator": None if allocator is None else allocator.state_dict(),
        "rng": rng_state(),
        "extra": extra or {},
    }
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "run_id": run_id,
        "sha256": state_digest({"run_id": run_id, "state": state}),
        "state": state,
    }
    if path.is_file():
        os.replace(path, previous_checkpoint(path))
    return atomic_write(path, lambda file: torch.save(payload, file))


def read_checkpoint(path: str | Path, run_id: str | None = None) -> dict[str, Any]:
    """The verified state of a :func:`save_checkpoint` file, without touching any model.

    Args:
        path: checkpoint file.
        run_id: the run the checkpoint must belong to (None: any).

    Raises:
        CheckpointError: if the file cannot be read, is not a checkpoint of this format version, fails its
            SHA-256 check (``damaged``), or belongs to another run.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read ({error.strerror or error})", damaged=True) from None
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types on foreign bytes; their text may advise unsafe loading
        raise CheckpointError(
            f"{path.name} is damaged: it cannot be read as a checkpoint ({type(error).__name__})", damaged=True
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or not isinstance(payload.get("state"), dict):
        raise CheckpointError(
            f"{path.name} is damaged: it is not an adalora checkpoint (or one an older adalora wrote)", damaged=True
        )
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path.name} has checkpoint format version {version!r}; this adalora reads version {FORMAT_VERSION} only"
        )
    state = payload["state"]
    try:
        digest = state_digest({"run_id": payload.get("run_id"), "state": state})
    except TypeError:
        digest = None
    if digest != payload.get("sha256"):
        raise CheckpointError(
            f"{path.name} is damaged: its contents fail their SHA-256 check (changed after it was written)",
            damaged=True,
        )
    if run_id is not None and payload.get("run_id") != run_id:
        raise CheckpointError(
            f"{path.name} belongs to another run (run id {payload.get('run_id')}, this run's is {run_id}): a "
            "checkpoint copied from elsewhere is never resumed"
        )
    return state


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    allocator: Any | None = None,
    restore_rng: bool = True,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Restore a :func:`save_checkpoint` file into freshly built objects; returns its ``extra`` dict.

    The file is read and checked (:func:`read_checkpoint`; its trainable tensors' names and shapes against
    ``model``) before any object is changed.

    Raises:
        CheckpointError: if the file cannot be used (see :func:`read_checkpoint`) or does not fit the model,
            optimizer or allocator.
    """
    state = read_checkpoint(path, run_id)
    name = Path(path).name
    mismatch = trainable_state_mismatch(unwrap_model(model), state["model"])
    if mismatch:
        raise CheckpointError(f"{name} does not fit this model (another method, rank or target modules): {mismatch}")
    if allocator is not None and state["allocator"] is None:
        raise CheckpointError(f"{name} holds no allocator state, but this run has an allocator (another method)")
    try:
        load_trainable_state_dict(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        if allocator is not None:
            allocator.load_state_dict(state["allocator"])
    except (ValueError, KeyError, TypeError) as error:
        detail = " ".join(str(error).split()).rstrip(".")
        raise CheckpointError(f"{name} does not fit this run: {detail}") from None
    if restore_rng:
        set_rng_state(state["rng"])
    return state["extra"]


def load_latest_checkpoint(path: str | Path, **objects: Any) -> tuple[dict[str, Any], Path, list[str]]:
    """:func:`load_checkpoint` of ``path``, or of :func:`previous_checkpoint` when ``path`` is missing or damaged.

    Args:
        path: the newest checkpoint file.
        objects: keyword arguments of :func:`load_checkpoint` (``model``, ``optimizer``, ..., ``run_id``).

    Returns:
        ``(extra, the file loaded, one line per newer file passed over and why)``.

    Raises:
        CheckpointError: if neither file can be loaded (the message gives each one's reason), or the newest is
            sound but belongs elsewhere (another run or model: never replaced by an older one).
        FileNotFoundError: if neither file exists.
    """
    path = Path(path)
    candidates = [p for p in (path, previous_checkpoint(path)) if p.is_file()]
    if not candidates:
        raise FileNotFoundError(f"no checkpoint at {path}")
    passed: list[str] = [] if path.is_file() else [f"{path.name} is missing (the run stopped while writing it)"]
    for candidate in candidates:
        try:
            return load_checkpoint(candidate, **objects), candidate, passed
        except CheckpointError as error:
            passed.append(str(error))
            if not error.damaged:  # sound but not ours: an older checkpoint must not silently stand in for it
                raise CheckpointError("; ".join(passed)) from None
    raise CheckpointError("; ".join(passed), damaged=True)
