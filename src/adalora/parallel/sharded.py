"""FSDP2 (``fully_shard``): the adapters' tensors are ``DTensor``s, each process holding some of their rows.

:class:`ShardedLayout` keeps the importance statistics of the local rows only (memory divided by the number of
shards, no communication per step) and completes the triplet scores with one all-reduce over the shard group at each
allocation, so that the global top-b sees the same complete scores on every process. Masks are written into the
local rows of lambda.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..layers import SVDAdapter
from .layout import Layout


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter sharded by FSDP2 or tensor parallelism).

    A ``DTensor`` can exist only once ``torch.distributed.tensor`` has been imported (by ``fully_shard`` or the
    user), so its class is looked up among the loaded modules: importing it here would add about 0.6 s to every
    ``import adalora``, sharded or not.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a ``DTensor`` is all-gathered (differentiably: the backward pass hands each process the
    gradient of its own rows), any other tensor is returned as it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def sharded_adapters(adapters: Sequence[SVDAdapter]) -> bool:
    """True if the adapters' factors are FSDP2-sharded, False if they are plain tensors.

    Raises:
        ValueError: if only some of them are sharded (the rest would train unsynchronised).
    """
    flags = [is_sharded(p) for a in adapters for p in a.adapter_parameters()]
    if all(flags):
        return True
    if not any(flags):
        return False
    raise ValueError(
        "AdaLoRA: some adapter parameters are sharded by FSDP (fully_shard) and others are not; the unsharded "
        "ones would get no gradient synchronisation. Apply fully_shard to the root module as well "
        "(fully_shard(layer) for each layer, then fully_shard(model))."
    )


def _shard_group(param: Any) -> tuple[Any, int]:
    """(mesh, mesh dimension that shards dim 0) of an FSDP2 parameter; clear error for other placements."""
    placements = param.placements
    shard_dims = [i for i, p in enumerate(placements) if p.is_shard()]
    if len(shard_dims) != 1 or not all(p.is_replicate() or p.is_shard(dim=0) for p in placements):
        raise ValueError(
            f"AdaLoRA supports adapter parameters sharded on dim 0 over one mesh dimension (FSDP2's default, "
            f"optionally replicated over another: HSDP), got placements {tuple(placements)}. Do not pass a "
            "shard_placement_fn that shards AdaLoRA's P, E or Q on another dimension."
        )
    return param.device_mesh, shard_dims[0]


def shard_rows(param: Any) -> range:
    """Rows of the full tensor held locally: FSDP2 splits dim 0 like ``torch.chunk`` (ceil-sized chunks)."""
    mesh, mesh_dim = _shard_group(param)
    size, index = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    rows = param.shape[0]
    chunk = -(-rows // size)
    lo, hi = min(index * chunk, rows), min((index + 1) * chunk, rows)
    local_rows = param.to_local().shape[0]
    if local_rows != hi - lo:
        raise ValueError(
            f"AdaLoRA: unexpected FSDP shard of a tensor of {rows} rows: {local_rows} local rows, expected "
            f"{hi - lo} (rows {lo}:{hi}). This version of PyTorch shards differently from torch.chunk; "
            "please report it."
        )
    return range(lo, hi)


class ShardedLayout(Layout):
    """Each process holds a shard (rows ``Shard(0)``) of every P, lambda and Q and of their gradients (FSDP2).

    Statistics are element-wise, so the tracker keeps those of the local rows and updates them from local values
    and gradients; whether a step's sensitivities are all finite is agreed over the shard group (a one-element
    all-reduce), so that a NaN in one process's shard skips the update everywhere, as in a single process. A
    triplet score (eq. 7) averages a whole column of P, which is split across processes, so each process's partial
    scores are summed over the shard group (:meth:`sum_scores`, one all-reduce per allocation).

    Checkpoints: the allocator's state holds this process's shard of the statistics; save it per process.
    """

    supports_compaction = False  # FSDP holds on to the parameters that compaction would replace
    per_process_state = True

    def __init__(self, adapters: Sequence[SVDAdapter]) -> None:
        super().__init__(adapters)
        mesh, mesh_dim = _shard_group(adapters[0].E)
        for a in adapters:
            for p in a.adapter_parameters():
                if _shard_group(p) != (mesh, mesh_dim):
                    raise ValueError(
                        "AdaLoRA: adapter parameters are sharded over different device meshes; the global "
                        "allocation needs one. Shard the whole model over the same mesh."
                    )
        self.group = mesh.get_group(mesh_dim)

    @classmethod
    def applies(cls, model: Any, optimizer: Any, adapters: Sequence[SVDAdapter]) -> bool:
        return sharded_adapters(adapters)

    def _device(self) -> torch.device:
        return self.adapters[0].E.to_local().device  # type: ignore[attr-defined]

    def rows(self, tensor: torch.Tensor) -> range:
        return shard_rows(tensor)

    def values(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        # Re-read at every update: FSDP may re-create a parameter's local storage (e.g. at its lazy init).
        return [p.to_local() for p in params]  # type: ignore[attr-defined]

    def gradients(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        return [g.to_local() if g is not None and is_sharded(g) else g for g in (p.grad for p in params)]

    def all_finite(self, finite: torch.Tensor) -> torch.Tensor:
        flag = finite.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return flag.bool()

    def sum_scores(self, scores: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(scores, op=dist.ReduceOp.SUM, group=self.group)
        return scores

    def replaced(self, params: Sequence[torch.Tensor]) -> bool:
        return False  # the tracked parameters are FSDP's own DTensors, which it keeps for the life of the model

    def mask(self, keep: torch.Tensor) -> None:
        self.reapply_masks()  # the adapters' rank_mask buffers already hold ``keep``

    def freeze_masks(self) -> None:
        """Nothing to prepare: sharded adapters re-mask their local rows at every final-phase step."""

    @torch.no_grad()
    def reapply_masks(self) -> None:
        """Zero the masked entries of each process's rows of lambda (the ``rank_mask`` buffers are replicated)."""
        for a in self.adapters:
            span = shard_rows(a.E)
            local = a.E.to_local()  # type: ignore[attr-defined]
            local.mul_(a.rank_mask[span.start : span.stop].to(local.dtype))
