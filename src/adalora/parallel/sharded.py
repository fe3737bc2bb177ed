"""FSDP2 (``fully_shard``): importance statistics kept per shard, scores all-reduced before the top-b."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist

from ..config import RegularizerForm
from ..importance import ImportanceTracker
from ..layers import SVDAdapter
from ..regularizer import orthogonal_penalty
from .consistency import check_allocation_consistency
from .processes import is_distributed


# ---------------------------------------------------------------------- FSDP2: sharded adapter parameters
def _dtensor_type() -> type | None:
    if not dist.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.4 keeps it under torch.distributed._tensor
        return None
    return DTensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter sharded by FSDP2 or tensor parallelism)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


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


@dataclass(frozen=True)
class _ShardLayout:
    """Where this process's shard of a tensor lies along dim 0 of the full tensor: rows ``lo:hi``."""

    lo: int
    hi: int


def _shard_group(param: torch.Tensor) -> tuple[Any, int]:
    """(mesh, mesh dimension that shards dim 0) of an FSDP2 parameter; clear error for other layouts."""
    from torch.distributed.tensor import Replicate, Shard

    placements = param.placements  # type: ignore[attr-defined]
    shard_dims = [i for i, p in enumerate(placements) if isinstance(p, Shard)]
    supported = len(shard_dims) == 1 and all(
        isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in placements
    )
    if not supported:
        raise ValueError(
            f"AdaLoRA supports adapter parameters sharded on dim 0 over one mesh dimension (FSDP2's default, "
            f"optionally replicated over another: HSDP), got placements {tuple(placements)}. Do not pass a "
            "shard_placement_fn that shards AdaLoRA's P, E or Q on another dimension."
        )
    return param.device_mesh, shard_dims[0]  # type: ignore[attr-defined]


def _dim0_range(param: torch.Tensor) -> _ShardLayout:
    """Rows of the full tensor held locally: FSDP2 splits dim 0 like ``torch.chunk`` (ceil-sized chunks)."""
    mesh, mesh_dim = _shard_group(param)
    size, index = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    rows = param.shape[0]
    chunk = -(-rows // size)
    lo, hi = min(index * chunk, rows), min((index + 1) * chunk, rows)
    local_rows = param.to_local().shape[0]  # type: ignore[attr-defined]
    if local_rows != hi - lo:
        raise ValueError(
            f"AdaLoRA: unexpected FSDP shard of a tensor of {rows} rows: {local_rows} local rows, expected "
            f"{hi - lo} (rows {lo}:{hi}). This version of PyTorch shards differently from torch.chunk; "
            "please report it."
        )
    return _ShardLayout(lo, hi)


class ShardedImportanceTracker(ImportanceTracker):
    """:class:`~adalora.importance.ImportanceTracker` for adapters sharded by FSDP2.

    The element statistics (eq. 8-11) are element-wise, so each process keeps them for its own shard only: the
    parent's flat layout holds the local rows of every P ``(p_rows, r)``, lambda ``(r_local,)`` and Q
    ``(r_local, d_in)``, and the parent's update runs on local values and local gradients, with one difference:
    whether a step's sensitivities are all finite is agreed over the shard group (a one-element all-reduce), so
    that a NaN in one process's shard skips the update everywhere, as in a single process. A triplet score
    (eq. 7) averages a whole column of P, which is split across processes, so :meth:`triplet_scores` adds up each
    process's partial scores (P: partial column sums / d_out; lambda and Q: complete terms for the local triplets,
    zero elsewhere) with one all-reduce over the shard group. Every process then holds the same complete scores.

    Checkpoints: :meth:`state_dict` holds this process's shard of the statistics; save it per process.
    """

    supports_compaction = False  # FSDP holds on to the parameters that compaction would replace
    per_process_state = True

    def __init__(self, adapters: list[SVDAdapter], metric: str, beta1: float, beta2: float) -> None:
        if not adapters:
            raise ValueError("ShardedImportanceTracker needs at least one adapter")
        mesh, mesh_dim = _shard_group(adapters[0].E)
        for a in adapters:
            for p in a.adapter_parameters():
                if _shard_group(p) != (mesh, mesh_dim):
                    raise ValueError(
                        "AdaLoRA: adapter parameters are sharded over different device meshes; the global "
                        "allocation needs one. Shard the whole model over the same mesh."
                    )
        self.group = mesh.get_group(mesh_dim)
        super().__init__(adapters, metric, beta1, beta2)

    # ------------------------------------------------------------------ layout hooks
    @staticmethod
    def _common_device(adapters: Sequence[SVDAdapter]) -> torch.device:
        return adapters[0].E.to_local().device  # type: ignore[attr-defined]

    def _local_rows(self, adapter: SVDAdapter) -> tuple[int, int, int]:
        rows, triplets = _dim0_range(adapter.P), _dim0_range(adapter.E)
        if _dim0_range(adapter.Q) != triplets:
            raise ValueError("AdaLoRA: lambda and Q of an adapter are sharded differently; please report it.")
        return rows.hi - rows.lo, triplets.lo, triplets.hi

    def _values(self) -> list[torch.Tensor]:
        # Re-read on every update: FSDP may re-create a parameter's local storage (e.g. at its lazy init).
        return [p.to_local() for p in self._params]  # type: ignore[attr-defined]

    def _local(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        return [g.to_local() if is_sharded(g) else g for g in grads]

    def _agree(self, finite: torch.Tensor) -> torch.Tensor:
        flag = finite.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return flag.bool()

    def stale(self) -> bool:
        return False  # the tracked parameters are FSDP's own DTensors

    # ------------------------------------------------------------------ scores, masks, regulariser, checks
    @torch.no_grad()
    def triplet_scores(self) -> torch.Tensor:
        """Complete S for every triplet, shape ``(sum of r,)``, identical on every process (one all-reduce)."""
        if self.metric.reads_lambda_only:
            partial = []
            for a in self.adapters:
                full = torch.zeros(a.r, dtype=torch.float32, device=self.device)
                span = _dim0_range(a.E)
                full[span.lo : span.hi] = a.E.to_local().abs().float()  # type: ignore[attr-defined]
                partial.append(full)
            scores = torch.cat(partial)
        else:
            element = self._element_scores()
            per_group = []
            for group in self.groups:
                s_p, s_e, s_q = group.views(element)
                # Partial column sums of P over the local rows; the all-reduce completes the mean over d_out.
                full = s_p.sum(dim=1) / group.d_out  # (g, r)
                full[:, group.lo : group.hi] += s_e + s_q.mean(dim=2)  # complete local terms
                per_group.append(full.reshape(-1))
            scores = torch.cat(per_group)[self._to_model_order]
        dist.all_reduce(scores, op=dist.ReduceOp.SUM, group=self.group)
        return scores

    def mask(self, keep: torch.Tensor) -> None:
        reapply_sharded_masks(self.adapters)

    def freeze_masks(self) -> None:
        """Nothing to prepare: sharded adapters re-mask their local shards at every final-phase step."""

    def reapply_frozen_masks(self) -> None:
        reapply_sharded_masks(self.adapters)

    def penalty(self, form: str) -> torch.Tensor:
        return sharded_orthogonal_penalty(self.adapters, form)  # type: ignore[arg-type]

    def add_penalty_gradient(self, weight: float, form: str) -> torch.Tensor:
        """Autograd on R alone, through the same all-gather as :meth:`penalty`: the backward pass accumulates each
        process's shard of the gradient into its ``.grad``."""
        value = weight * self.penalty(form)
        value.backward()
        return value.detach()

    def verify(self, step: int, budget: int, keep: torch.Tensor, scores: torch.Tensor, names: Sequence[str]) -> None:
        check_allocation_consistency(step, budget, keep, scores, names, self.ranks)


class ReplicatedImportanceTracker(ImportanceTracker):
    """The one-process tracker for adapters replicated over several processes (DDP).

    DDP all-reduces the gradients during ``backward()``, so every process computes the same statistics, scores
    and masks without any communication; :meth:`verify` checks that they do when asked for.
    """

    supports_compaction = False  # DDP holds on to the parameters that compaction would replace

    def verify(self, step: int, budget: int, keep: torch.Tensor, scores: torch.Tensor, names: Sequence[str]) -> None:
        check_allocation_consistency(step, budget, keep, scores, names, self.ranks)


def parallel_tracker(adapters: list[SVDAdapter], metric: str, beta1: float, beta2: float) -> ImportanceTracker | None:
    """The tracker for adapters sharded by FSDP2 or replicated over a process group; None in one process."""
    if sharded_adapters(adapters):
        return ShardedImportanceTracker(adapters, metric, beta1, beta2)
    if is_distributed():
        return ReplicatedImportanceTracker(adapters, metric, beta1, beta2)
    return None


@torch.no_grad()
def reapply_sharded_masks(adapters: Sequence[SVDAdapter]) -> None:
    """Zero the masked entries of each process's shard of lambda (the masks themselves are replicated)."""
    for a in adapters:
        span = _dim0_range(a.E)
        local = a.E.to_local()  # type: ignore[attr-defined]
        local.mul_(a.rank_mask[span.lo : span.hi].to(local.dtype))


@dataclass
class _GatheredFactors:
    """P and Q of one adapter as plain tensors: what :func:`orthogonal_penalty` reads."""

    P: torch.Tensor
    Q: torch.Tensor


def sharded_orthogonal_penalty(adapters: Sequence[SVDAdapter], form: RegularizerForm) -> torch.Tensor:
    """R(P, Q) for FSDP2-sharded adapters, as a plain tensor that can be added to any loss.

    Each P and Q is all-gathered (``full_tensor()``, differentiable); the backward pass hands each process the
    rows of its own shard. The regulariser is computed identically on every process, so its gradient is the
    exact gradient of gamma * R, added to FSDP's averaged task gradient as in a single process. The gather
    costs one all-gather of the adapters per step (FSDP gathers them for the forward pass anyway); computing
    the Gram matrices on DTensors directly does not work (no sharding rule for the norm's backward).
    """
    full = [_GatheredFactors(a.P.full_tensor(), a.Q.full_tensor()) for a in adapters]  # type: ignore[attr-defined]
    return orthogonal_penalty(cast(Sequence[SVDAdapter], full), form)
