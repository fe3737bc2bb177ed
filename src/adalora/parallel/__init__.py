"""Data-parallel training: identical allocations on every process, under DDP and FSDP2.

AdaLoRA adds state that must agree across processes: the importance statistics and the masks. If two
processes kept different triplets, their replicas would silently diverge. This package holds everything the
rest of the library needs to know about ``torch.distributed``; nothing here runs (or costs anything) in a
single process.

How the adapters' tensors lie over processes is one extension point: a :class:`~.layout.Layout`, picked by
:func:`layout_for` from :data:`LAYOUTS`. The allocator and the importance tracker ask it what they need and never
which one they have.

**DDP** (``DistributedDataParallel``, ``torchrun``, ``accelerate launch``, the Trainer; :class:`ReplicatedLayout`):
identical by construction. DDP all-reduces the gradients during ``backward()``, so after ``optimizer.step()`` every
process holds the same adapter values and the same ``.grad``; the importance statistics (eq. 8-11), the scores
(eq. 7) and the stable-sort top-b (:func:`adalora.allocator.top_b_mask`) are deterministic functions of those, so
every process computes the same masks without any communication. :func:`check_allocation_consistency` verifies it
(one all-reduce per allocation, only when asked for).

**FSDP2** (``torch.distributed.fsdp.fully_shard``; :class:`ShardedLayout`): every process holds a shard (rows
``Shard(0)``) of each P, lambda and Q and of their gradients, keeps the element statistics of its shard only, and
all-reduces the partial triplet scores over the shard group at each allocation, so the global top-b sees the same
complete scores on every process. Masks are applied to the local shard of lambda.

**DeepSpeed** is refused when the allocator is built (:data:`DEEPSPEED_REFUSAL`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..layers import SVDAdapter
from .consistency import (
    CHECK_ENV,
    ConsistencyError,
    check_allocation_consistency,
    consistency_check_requested,
    mask_fingerprint,
)
from .launch import DEEPSPEED_REFUSAL, deepspeed_in_use, launch_problem
from .layout import Layout, ReplicatedLayout
from .processes import (
    barrier,
    from_main_process,
    get_local_world_size,
    get_rank,
    get_world_size,
    init_from_env,
    is_distributed,
    is_main_process,
    mean_over_processes,
)
from .save import gathered_adapters, save_adapter_collective
from .sharded import ShardedLayout, full_tensor, is_sharded, sharded_adapters

LAYOUTS: tuple[type[Layout], ...] = (ShardedLayout, ReplicatedLayout)
"""The layouts over several processes, most specific first; one process holding everything (:class:`Layout`) is the
fallback. A new way of laying adapters out (e.g. DeepSpeed ZeRO) is one more entry."""


def layout_for(model: Any, optimizer: Any, adapters: Sequence[SVDAdapter]) -> Layout:
    """The layout of ``adapters``: the first :data:`LAYOUTS` entry whose ``applies`` accepts them, else one process.

    Args:
        model: the model as given to the allocator (a DDP or DeepSpeed wrapper included).
        optimizer: the optimizer that trains the adapters, or None.
        adapters: the adapters, in model order.

    Raises:
        ValueError: DeepSpeed manages the model or the optimizer (see :data:`DEEPSPEED_REFUSAL`), or the adapters
            are laid out in a way no layout supports (some sharded and others not, several meshes or devices).
    """
    deepspeed = deepspeed_in_use(model, optimizer, adapters)
    if deepspeed is not None:
        raise ValueError(f"RankAllocator: {deepspeed}. {DEEPSPEED_REFUSAL}")
    for layout in LAYOUTS:
        if layout.applies(model, optimizer, adapters):
            return layout(adapters)
    return Layout(adapters)


__all__ = [
    "CHECK_ENV",
    "DEEPSPEED_REFUSAL",
    "LAYOUTS",
    "ConsistencyError",
    "Layout",
    "ReplicatedLayout",
    "ShardedLayout",
    "barrier",
    "check_allocation_consistency",
    "consistency_check_requested",
    "deepspeed_in_use",
    "from_main_process",
    "full_tensor",
    "gathered_adapters",
    "get_local_world_size",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "is_sharded",
    "launch_problem",
    "layout_for",
    "mask_fingerprint",
    "mean_over_processes",
    "save_adapter_collective",
    "sharded_adapters",
]
