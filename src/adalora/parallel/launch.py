"""How training was set up, checked when a RankAllocator is built: DeepSpeed (which picks
:class:`adalora.parallel.zero.ZeroLayout`) and launchers that started independent processes instead of one training
(reported by :meth:`adalora.parallel.layout.Layout.setup_problem`).
"""

from __future__ import annotations

import os
from typing import Any

from .processes import is_distributed


def from_deepspeed(obj: Any) -> bool:
    """Whether ``obj`` is an instance of a class from the ``deepspeed`` package (read without importing it)."""
    return any(cls.__module__.split(".")[0] == "deepspeed" for cls in type(obj).__mro__)


def deepspeed_optimizer(model: Any, optimizer: Any) -> Any | None:
    """The optimizer DeepSpeed steps (a ZeRO optimizer, or what the engine wraps at stage 0), or None.

    Found on the engine (``model.optimizer``) or in the chain of wrappers around ``optimizer`` (accelerate's
    ``DeepSpeedOptimizerWrapper`` holds the ZeRO optimizer as ``.optimizer``, which holds the torch one).
    """
    if from_deepspeed(model) and getattr(model, "optimizer", None) is not None:
        return model.optimizer
    while optimizer is not None:
        if from_deepspeed(optimizer):
            return optimizer
        inner = getattr(optimizer, "optimizer", None)
        optimizer = None if inner is optimizer else inner
    return None


def deepspeed_in_use(model: Any, optimizer: Any, adapters: list[Any]) -> str | None:
    """What shows that DeepSpeed manages ``model``/``optimizer``, or None: an engine around the model, a DeepSpeed
    optimizer (possibly inside accelerate's wrapper), or adapter parameters that ZeRO partitions (``ds_id``) or links
    to its fp32 master copies (``_hp_mapping``). Read from types and attributes, without importing deepspeed."""
    if from_deepspeed(model):
        return f"the model is a {type(model).__name__}"
    found = deepspeed_optimizer(None, optimizer)
    if found is not None:
        return f"the optimizer is DeepSpeed's {type(found).__name__}"
    for adapter in adapters:
        for p in adapter.adapter_parameters():
            if hasattr(p, "ds_id") or hasattr(p, "ds_numel"):
                return "the adapters' parameters are partitioned by ZeRO-3 (ds_id/ds_numel)"
            if hasattr(p, "_hp_mapping"):
                return "the adapters' parameters have fp32 master copies in a ZeRO optimizer (_hp_mapping)"
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
