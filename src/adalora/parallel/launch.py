"""How training was set up, checked when a RankAllocator is built: DeepSpeed (refused by
:func:`adalora.parallel.layout_for`) and launchers that started independent processes instead of one training
(reported by :meth:`adalora.parallel.layout.Layout.setup_problem`).
"""

from __future__ import annotations

import os
from typing import Any

from .processes import is_distributed

DEEPSPEED_REFUSAL = (
    "AdaLoRA does not support DeepSpeed: under ZeRO the gradients live in DeepSpeed's partitioned buffers, not in the "
    "parameters' .grad (and ZeRO-3 partitions the parameters themselves), so the importance scores would read "
    "nothing and every triplet would look unimportant. Supported: one process, DDP (torchrun / accelerate launch / "
    "the Trainer with several processes) and FSDP2 (fully_shard); see docs/scaling-out.md."
)


def deepspeed_in_use(model: Any, optimizer: Any, adapters: list[Any]) -> str | None:
    """What shows that DeepSpeed manages ``model``/``optimizer``, or None: an engine around the model, a DeepSpeed
    optimizer, or ZeRO-3 partitioned adapter parameters (``ds_id``/``ds_numel``). Read from types and attributes,
    without importing deepspeed."""

    def from_deepspeed(obj: Any) -> bool:
        return any(cls.__module__.split(".")[0] == "deepspeed" for cls in type(obj).__mro__)

    if from_deepspeed(model):
        return f"the model is a {type(model).__name__}"
    if optimizer is not None and from_deepspeed(optimizer):
        return f"the optimizer is DeepSpeed's {type(optimizer).__name__}"
    for adapter in adapters:
        for p in adapter.adapter_parameters():
            if hasattr(p, "ds_id") or hasattr(p, "ds_numel"):
                return "the adapters' parameters are partitioned by ZeRO-3 (ds_id/ds_numel)"
    return None


def launch_problem(check_consistency: bool) -> str | None:
    """What is wrong with the process setup, as seen from here, or None.

    A launcher (``torchrun``, ``accelerate launch``) sets ``WORLD_SIZE``; when it says several processes but no
    process group is running, each process trains on its own (``accelerate launch --multi_gpu`` on a machine
    without GPUs and without ``Accelerator(cpu=True)`` does this), so the allocations are never compared or
    averaged. A consistency check asked for in a single process has nothing to compare.
    """
    world = os.environ.get("WORLD_SIZE", "1")
    running = is_distributed()
    if world.isdigit() and int(world) > 1 and not running:
        return (
            f"the launcher set WORLD_SIZE={world} but no torch.distributed process group with "
            "several processes is running: each process is training on its own, on its own data, and its "
            "allocation is never compared with the others'. On a CPU, build Accelerator(cpu=True) (or call "
            "torch.distributed.init_process_group('gloo')) before the model and the RankAllocator."
        )
    if check_consistency and not running:
        return (
            "a consistency check was requested (check_consistency=True or ADALORA_CHECK_CONSISTENCY=1) "
            "but this is a single process: there is nothing to compare, and the check does nothing."
        )
    return None
