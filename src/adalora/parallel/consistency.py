"""The cross-process consistency check of an allocation (one all-reduce per allocation, only when asked for)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

CHECK_ENV = "ADALORA_CHECK_CONSISTENCY"
"""Environment variable that switches the cross-process consistency check on (``1``) without code changes."""


class ConsistencyError(RuntimeError):
    """The processes of one training run disagree about the allocation (raised on every process at once)."""


def consistency_check_requested(flag: bool | None = None) -> bool:
    """The explicit ``flag`` if given, else whether ``ADALORA_CHECK_CONSISTENCY`` is set to a true value."""
    if flag is not None:
        return bool(flag)
    return os.environ.get(CHECK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def mask_fingerprint(masks: Sequence[torch.Tensor]) -> str:
    """A short SHA-256 of the masks (and of how they split into adapters), for logs and tests.

    Args:
        masks: one bool mask per adapter, e.g. ``[a.rank_mask for a in adapters]``, each of shape ``(r_k,)``.

    Returns:
        16 hex digits; equal fingerprints mean equal masks (up to SHA-256 collisions).
    """
    digest = hashlib.sha256()
    for mask in masks:
        flat = mask.detach().reshape(-1).to(device="cpu", dtype=torch.uint8)
        digest.update(flat.numel().to_bytes(8, "little"))
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()[:16]


def check_allocation_consistency(
    step: int,
    budget: int,
    keep: torch.Tensor,
    scores: torch.Tensor,
    names: Sequence[str],
    ranks: Sequence[int],
    group: Any = None,
) -> None:
    """Raise on every process at once if the processes disagree about this allocation.

    Compares, across all processes of ``group``, the step, the budget, the kept-triplet mask and the triplet
    scores, exactly (not through a hash, so the error can name the modules that differ). The scores must agree
    bitwise, not just the masks: under DDP they are computed from the same all-reduced gradients by the same
    deterministic operations, so any difference means the replicas are drifting apart (typically a model not
    wrapped in DDP) before the masks show it.

    Mechanism: one all-reduce (MAX) of ``[x, -x]`` yields the maximum and minimum over processes of every
    entry, and they are equal everywhere iff all processes agree. Its cost is one collective of ``4 n + 4``
    floats (n = number of triplets) per allocation, independent of the number of processes; allocation steps
    synchronise the host anyway. Every process receives the same reduced tensor, so either all raise or none
    does (no process is left waiting in a collective).

    Args:
        step: the allocator's t.
        budget: b(t).
        keep: bool mask over all triplets, shape ``(n,)``, in adapter order.
        scores: triplet scores S, shape ``(n,)``.
        names: module name of each adapter (for the error message).
        ranks: number of triplets of each adapter (their sum is n).
        group: process group; None for the default one.

    Raises:
        ConsistencyError: if the step, the budget, any mask entry or any score differs between processes.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) <= 1:
        return
    n = keep.numel()
    # float64 holds the step, the budget and the 0/1 mask exactly; scores (float32) convert exactly too.
    local = torch.cat(
        [
            torch.tensor([step, budget], dtype=torch.float64, device=scores.device),
            keep.to(torch.float64),
            # NaN never equals itself; map it to -inf so that identical NaN scores compare equal.
            scores.detach().to(torch.float64).nan_to_num(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf),
        ]
    )
    payload = torch.cat([local, -local])
    dist.all_reduce(payload, op=dist.ReduceOp.MAX, group=group)
    high, low = payload[: n * 2 + 2], -payload[n * 2 + 2 :]
    if torch.equal(high, low):
        return
    raise ConsistencyError(
        f"AdaLoRA allocation at step {step} differs across the {dist.get_world_size(group)} processes: "
        + "; ".join(_differences(high.cpu(), low.cpu(), names, ranks))
        + ". The replicas have diverged. Usual causes: the model is not wrapped in DistributedDataParallel (or "
        "FSDP), so gradients are not averaged; processes started from different weights or seeds; the "
        "allocator stepped at different times; non-deterministic kernels on different hardware."
    )


def _differences(high: torch.Tensor, low: torch.Tensor, names: Sequence[str], ranks: Sequence[int]) -> list[str]:
    """What differs between processes, from the maxima and minima over them of ``[step, budget, keep, scores]``."""
    n = sum(ranks)
    problems = []
    if high[0] != low[0] or high[1] != low[1]:
        problems.append(
            f"the processes are at different steps or budgets (t from {int(low[0])} to {int(high[0])}, b from "
            f"{int(low[1])} to {int(high[1])}): the allocator was not stepped once per optimizer step everywhere"
        )
    differ = (high[2 : n + 2] != low[2 : n + 2]).split(list(ranks))
    spread = float((high[n + 2 :] - low[n + 2 :]).abs().max())
    modules = [name for name, d in zip(names, differ, strict=True) if bool(d.any())]
    if modules:
        listed = ", ".join(modules[:6]) + (f", ... ({len(modules)} modules)" if len(modules) > 6 else "")
        problems.append(
            f"{sum(int(d.sum()) for d in differ)} triplet(s) are kept on some processes and masked on others, in "
            f"{listed}; the triplet scores differ by up to {spread:.3g}"
        )
    elif spread > 0:
        # Scores computed from the same all-reduced gradients are bitwise equal; any difference means the
        # replicas are drifting apart, even while the masks still happen to agree.
        problems.append(f"the masks agree but the triplet scores differ by up to {spread:.3g}")
    return problems
