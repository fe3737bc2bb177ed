"""Saving an adapter from several processes: gather FSDP2 shards and DeepSpeed ZeRO master copies, let rank 0 write,
raise everywhere on failure."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist
from torch import nn

from ..config import AdaLoRAConfig
from ..files.adapter import save_adapter
from ..inject import name_matches
from ..layers import find_adapters, unwrap_model
from .processes import is_distributed, is_main_process
from .sharded import is_sharded
from .zero import is_zero_parameter, whole


@contextlib.contextmanager
def gathered_adapters(model: nn.Module, config: AdaLoRAConfig) -> Iterator[nn.Module]:
    """Inside the block, the adapters and ``modules_to_save`` of a sharded or ZeRO-trained model hold whole tensors.

    Every P, E, Q and every parameter of a ``modules_to_save`` module that FSDP2 shards is all-gathered, and every one
    that DeepSpeed ZeRO trains is replaced by its whole fp32 master copy (what a one-process run would hold: ZeRO-3
    partitions the module's copy, and under bf16 it is rounded); each is put in place as a plain ``nn.Parameter``,
    and the originals are put back on exit. Only these (small) parameters are gathered, never the frozen base model.
    Do not run the model inside the block. A collective: every process must enter it. Without sharded or ZeRO
    parameters (one process, DDP) it does nothing.

    Yields:
        ``model`` (inside any DDP or DeepSpeed wrapper), ready for :func:`adalora.save_adapter`, the exports or any
        other reader of its adapter tensors.
    """
    model = unwrap_model(model)
    owned: list[tuple[nn.Module, str]] = [(a, attr) for _, a in find_adapters(model) for attr in ("P", "E", "Q")]
    for name, module in model.named_modules():
        if name and name_matches(name, config.modules_to_save):
            owned += [(m, key) for m in module.modules() for key in m._parameters]
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    seen: set[tuple[int, str]] = set()
    try:
        for module, key in owned:  # named_modules order: the same on every process, as collectives need
            param = module._parameters.get(key)
            if param is None or (id(module), key) in seen or not (is_sharded(param) or is_zero_parameter(param)):
                continue
            seen.add((id(module), key))
            full = param.full_tensor() if is_sharded(param) else whole(param)  # type: ignore[attr-defined]
            module._parameters[key] = nn.Parameter(full.detach().clone(), requires_grad=param.requires_grad)
            swapped.append((module, key, param))
        yield model
    finally:
        for module, key, param in reversed(swapped):
            module._parameters[key] = param


def save_adapter_collective(
    model: nn.Module, directory: str | os.PathLike[str], config: AdaLoRAConfig, metadata: dict | None = None
) -> Path | None:
    """:func:`adalora.save_adapter` for a model trained by several processes: call it on every process.

    Unwraps DDP and DeepSpeed, gathers FSDP2 shards and ZeRO master copies of the adapters
    (:func:`gathered_adapters`), and lets rank 0 alone write; the others wait until the directory is complete. A
    failure on rank 0 (disk full, bad path) is raised on every process, so none is left waiting. In a single process
    it is :func:`adalora.save_adapter`.

    Returns:
        The adapter directory on rank 0, None on the other processes.
    """
    with gathered_adapters(model, config) as model:
        if not is_distributed():
            return save_adapter(model, directory, config, metadata)
        path, failure = None, None
        if is_main_process():
            try:
                path = save_adapter(model, directory, config, metadata)
            except Exception as error:  # re-raised below, after the others have heard of it
                failure = error
        outcome = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise RuntimeError(f"save_adapter: rank 0 failed to write {directory}: {outcome[0]}")
    return path
