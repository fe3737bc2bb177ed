"""Process-group awareness: rank, world size, barrier, starting the group from a launcher's environment.

Nothing here runs (or costs anything) in a single process.
"""

from __future__ import annotations

import os
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a default process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's global rank: from the process group, else from the launcher's ``RANK``, else 0.

    The environment fallback lets code that runs before ``init_process_group`` (argument parsing, output
    directories) already know whether it is the main process under ``torchrun`` or ``accelerate launch``.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    """Number of processes: from the process group, else from the launcher's ``WORLD_SIZE``, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def get_local_world_size() -> int:
    """Processes on this machine, from the launcher's ``LOCAL_WORLD_SIZE`` (1 without a launcher)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on global rank 0 (and in a single process): the one process that writes files, logs and plots."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def mean_over_processes(value: float) -> float:
    """The mean of ``value`` over all processes (e.g. each one's loss on its share of the batch); one all-reduce."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()


def from_main_process(value: T) -> T:
    """Rank 0's ``value`` on every process (one broadcast; ``value`` itself in a single process): for decisions
    that only rank 0 can take, such as whether it got the lock of the output directory."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def init_from_env(backend: str | None = None) -> bool:
    """Start the default process group if a launcher asked for one and nobody has started it yet.

    ``torchrun`` and ``accelerate launch`` set ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
    this reads them (``env://``). Backend: ``nccl`` when CUDA is available, else ``gloo``.

    Returns:
        True if a process group with more than one process is running after the call.
    """
    if not dist.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            # One GPU per process, chosen by the launcher's LOCAL_RANK, before NCCL binds to a device.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return is_distributed()
