"""Saving an adapter from several processes: gather FSDP2 shards, let rank 0 write, raise everywhere on failure."""

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


@contextlib.contextmanager
def gathered_adapters(model: nn.Module, config: AdaLoRAConfig) -> Iterator[nn.Module]:
    """Inside the block, the adapters and ``modules_to_save`` of an FSDP2-sharded model hold full tensors.

    Every sharded P, E, Q and every sharded parameter of a ``modules_to_save`` module is all-gathered and put
    in place of the sharded one as a plain ``nn.Parameter``; the sharded parameters are put back on exit. Only
    these (small) parameters are gathered, never the frozen base model. Do not run the model inside the block.
    A collective: every process must enter it. Without sharded parameters (one process, DDP) it does nothing.

    Yields:
        ``model``, ready for :func:`adalora.save_adapter` or any other reader of its adapter tensors.
    """
    owners: list[nn.Module] = [a for _, a in find_adapters(model)]
    for name, module in model.named_modules():
        if name and name_matches(name, config.modules_to_save):
            owners += list(module.modules())
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    seen: set[int] = set()
    try:
        for module in owners:  # named_modules order: the same on every process, as collectives need
            if id(module) in seen:
                continue
            seen.add(id(module))
            for key, param in list(module._parameters.items()):
                if param is None or not is_sharded(param):
                    continue
                full = param.full_tensor().detach()  # type: ignore[attr-defined]
                module._parameters[key] = nn.Parameter(full, requires_grad=param.requires_grad)
                swapped.append((module, key, param))
        yield model
    finally:
        for module, key, param in reversed(swapped):
            module._parameters[key] = param


def save_adapter_collective(
    model: nn.Module, directory: str | os.PathLike[str], config: AdaLoRAConfig, metadata: dict | None = None
) -> Path | None:
    """:func:`adalora.save_adapter` for a model trained by several processes: call it on every process.

    Unwraps DDP, gathers FSDP2 shards of the adapters (:func:`gathered_adapters`), and lets rank 0 alone
    write; the others wait until the directory is complete. A failure on rank 0 (disk full, bad path) is
    raised on every process, so none is left waiting. In a single process it is :func:`adalora.save_adapter`.

    Returns:
        The adapter directory on rank 0, None on the other processes.
    """
    model = unwrap_model(model)
    with gathered_adapters(model, config):
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
