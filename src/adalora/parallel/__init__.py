"""Data-parallel training: identical allocations on every process, under DDP and FSDP2.

AdaLoRA adds state that must agree across processes: the importance statistics and the masks. If two
processes kept different triplets, their replicas would silently diverge. This module holds everything the
rest of the library needs to know about ``torch.distributed``; nothing here runs (or costs anything) in a
single process.

**DDP** (``DistributedDataParallel``, ``torchrun``, ``accelerate launch``, the Trainer): identical by
construction. DDP all-reduces the gradients during ``backward()``, so after ``optimizer.step()`` every process
holds the same adapter values and the same ``.grad``; the importance statistics (eq. 8-11), the scores (eq. 7)
and the stable-sort top-b (:func:`adalora.allocator.top_b_mask`) are deterministic functions of those, so every process
computes the same masks without any communication. :func:`check_allocation_consistency` verifies it (one
all-reduce per allocation, only when asked for).

**FSDP2** (``torch.distributed.fsdp.fully_shard``): every process holds a shard (rows ``Shard(0)``) of each
P, lambda and Q and of their gradients. :class:`ShardedImportanceTracker` keeps the element statistics of the
local shard only (memory divided by the number of shards, no communication per step) and all-reduces the
partial triplet scores over the shard group at each allocation, so the global top-b sees the same complete
scores on every process. Masks are applied to the local shard of lambda.
"""

from ..allocator import CHECK_ENV, consistency_check_requested, register_setup_check
from ..importance import register_tracker
from .consistency import ConsistencyError, check_allocation_consistency, mask_fingerprint
from .launch import DEEPSPEED_REFUSAL, deepspeed_in_use, launch_problem, setup_problem
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
from .sharded import (
    ReplicatedImportanceTracker,
    ShardedImportanceTracker,
    is_sharded,
    parallel_tracker,
    reapply_sharded_masks,
    sharded_adapters,
    sharded_orthogonal_penalty,
)

__all__ = [
    "CHECK_ENV",
    "DEEPSPEED_REFUSAL",
    "ConsistencyError",
    "ReplicatedImportanceTracker",
    "ShardedImportanceTracker",
    "barrier",
    "check_allocation_consistency",
    "consistency_check_requested",
    "deepspeed_in_use",
    "from_main_process",
    "gathered_adapters",
    "get_local_world_size",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "is_sharded",
    "launch_problem",
    "mask_fingerprint",
    "mean_over_processes",
    "parallel_tracker",
    "reapply_sharded_masks",
    "save_adapter_collective",
    "setup_problem",
    "sharded_adapters",
    "sharded_orthogonal_penalty",
]

# Offer the allocator's importance tracker a layout over processes before the one-process default.
register_tracker(parallel_tracker)
register_setup_check(setup_problem)
