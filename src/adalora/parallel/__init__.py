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

**DeepSpeed ZeRO** (stages 1-3; :class:`~.zero.ZeroLayout`): the gradients and fp32 master copies live in
DeepSpeed's partitioned buffers. The allocator reads them whole through DeepSpeed's API inside the engine's optimizer
step (where they exist), adds the regulariser's gradient there, and zeroes masked lambdas in both the master copy and
the module's parameters, so every process computes the same masks from the same whole gradients.
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
from .launch import deepspeed_in_use, launch_problem
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
from .zero import ZeroLayout

LAYOUTS: tuple[type[Layout], ...] = (ZeroLayout, ShardedLayout, ReplicatedLayout)
"""The layouts over several processes, most specific first; one process holding everything (:class:`Layout`) is the
fallback. A new way of laying adapters out is one more entry."""


def layout_for(model: Any, optimizer: Any, adapters: Sequence[SVDAdapter]) -> Layout:
    """The layout of ``adapters``: the first :data:`LAYOUTS` entry whose ``applies`` accepts them, else one process.

    Args:
        model: the model as given to the allocator (a DDP wrapper or DeepSpeed engine included).
        optimizer: the optimizer that trains the adapters as given to the allocator (wrappers included), or None.
        adapters: the adapters, in model order.

    Raises:
        ValueError: the adapters are laid out in a way no layout supports (some sharded and others not, several
            meshes or devices), or DeepSpeed runs with a feature AdaLoRA does not support (offloading, fp16, ...).
    """
    for layout in LAYOUTS:
        if layout.applies(model, optimizer, adapters):
            return layout.for_training(model, optimizer, adapters)
    return Layout(adapters)


__all__ = [
    "CHECK_ENV",
    "LAYOUTS",
    "ConsistencyError",
    "Layout",
    "ReplicatedLayout",
    "ShardedLayout",
    "ZeroLayout",
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
