"""FSDP2 (``fully_shard``): importance statistics kept per shard, scores all-reduced before the top-b."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from ..config import ImportanceMetric, RegularizerForm
from ..importance import ImportanceTracker
from ..layers import SVDAdapter
from ..regularizer import orthogonal_penalty


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


@dataclass(frozen=True)
class _LocalGroup:
    """Adapters sharing a global (d_out, d_in, r), hence the same local shard shapes; offsets into the buffers."""

    members: tuple[int, ...]  # adapter indices, in model order
    d_out: int  # global rows of P (the mean in eq. 7 divides by it)
    d_in: int
    r: int  # global number of triplets
    p_rows: int  # local rows of P
    triplets: _ShardLayout  # the local triplets: rows of lambda and Q held here
    p_offset: int
    e_offset: int
    q_offset: int

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Local statistics as ``(g, p_rows, r)``, ``(g, r_local)`` and ``(g, r_local, d_in)``."""
        g, r_local = len(self.members), self.triplets.hi - self.triplets.lo
        p = flat[self.p_offset : self.p_offset + g * self.p_rows * self.r].view(g, self.p_rows, self.r)
        e = flat[self.e_offset : self.e_offset + g * r_local].view(g, r_local)
        q = flat[self.q_offset : self.q_offset + g * r_local * self.d_in].view(g, r_local, self.d_in)
        return p, e, q


class ShardedImportanceTracker(ImportanceTracker):
    """:class:`~adalora.importance.ImportanceTracker` for adapters sharded by FSDP2.

    The element statistics (eq. 8-11) are element-wise, so each process keeps them for its own shard only:
    the flat buffers hold the local rows of every P ``(p_rows, r)``, lambda ``(r_local,)`` and Q
    ``(r_local, d_in)``, laid out in shape groups like the parent class, and :meth:`update` applies the parent's
    arithmetic to local values and local gradients (one scalar all-reduce per step, see there). A triplet score
    (eq. 7) averages a whole column of P, which is split across processes, so :meth:`triplet_scores` adds up
    each process's partial scores (P: partial column sums / d_out; lambda and Q: complete terms for the local
    triplets, zero elsewhere) with one all-reduce over the shard group. Every process then holds the same
    complete scores.

    Checkpoints: :meth:`state_dict` holds this process's shard of the statistics; save it per process.
    """

    def __init__(self, adapters: list[SVDAdapter], metric: ImportanceMetric, beta1: float, beta2: float) -> None:
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
        self.adapters = adapters
        self.metric = metric
        self.beta1, self.beta2 = beta1, beta2
        self.device = adapters[0].E.to_local().device  # type: ignore[attr-defined]
        self.ranks = [a.r for a in adapters]
        self.group = mesh.get_group(mesh_dim)

        # Equal global shapes shard identically, so the parent's shape groups carry over to the local shards.
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, a in enumerate(adapters):
            groups.setdefault((a.d_out, a.d_in, a.r), []).append(i)
        self._local_groups: list[_LocalGroup] = []
        self._dparams: list[nn.Parameter] = []
        offset = 0
        for (d_out, d_in, r), members in groups.items():
            first = adapters[members[0]]
            rows, triplets = _dim0_range(first.P), _dim0_range(first.E)
            if _dim0_range(first.Q) != triplets:
                raise ValueError("AdaLoRA: lambda and Q of an adapter are sharded differently; please report it.")
            p_rows, r_local = rows.hi - rows.lo, triplets.hi - triplets.lo
            g = len(members)
            p_off, e_off, q_off = offset, offset + g * p_rows * r, offset + g * p_rows * r + g * r_local
            offset = q_off + g * r_local * d_in
            self._local_groups.append(
                _LocalGroup(tuple(members), d_out, d_in, r, p_rows, triplets, p_off, e_off, q_off)
            )
            # Parameters listed in buffer order, so that concatenating their local shards lays out the buffer.
            self._dparams += [adapters[i].P for i in members]
            self._dparams += [adapters[i].E for i in members]
            self._dparams += [adapters[i].Q for i in members]
        self.numel = offset

        # Position of each adapter's triplets in the concatenation of per-group (complete) scores.
        starts = [0]
        for r in self.ranks:
            starts.append(starts[-1] + r)
        order = torch.empty(sum(self.ranks), dtype=torch.long)
        position = 0
        for group in self._local_groups:
            for i in group.members:
                order[starts[i] : starts[i + 1]] = torch.arange(position, position + group.r)
                position += group.r
        self._to_model_order = order.to(self.device)

        buffers = {"smoothed": 2, "sensitivity": 1, "magnitude": 0}[metric]
        zeros = (torch.zeros(self.numel, dtype=torch.float32, device=self.device) for _ in range(buffers))
        self.ibar: torch.Tensor | None = next(zeros, None)
        self.ubar: torch.Tensor | None = next(zeros, None)
        self.skipped = torch.zeros((), dtype=torch.long, device=self.device)

    def _local_values(self) -> list[torch.Tensor]:
        # Re-read on every update: FSDP may re-create a parameter's local storage (e.g. at its lazy init).
        return [p.to_local() for p in self._dparams]  # type: ignore[attr-defined]

    def parameters(self) -> list[torch.nn.Parameter]:
        """The tracked (sharded) parameters in buffer order; their ``.grad`` are sharded the same way."""
        return self._dparams

    @torch.no_grad()
    def update(self, grads: list[torch.Tensor]) -> None:
        """Fold one step's sensitivities of the local shards into the local statistics (eq. 8-10).

        The same arithmetic as :meth:`ImportanceTracker.update`, on local values and local gradients, with one
        difference: whether the step's sensitivities are all finite is agreed over the shard group (a one-element
        all-reduce), so that a NaN in one process's shard skips the update everywhere, as in a single process.

        Args:
            grads: one (sharded) gradient per tracked parameter, in :meth:`parameters` order.
        """
        if self.ibar is None:
            return
        products = torch._foreach_mul(self._local_values(), [g.to_local() if is_sharded(g) else g for g in grads])
        sensitivity = torch.cat([t.reshape(-1) for t in products]).abs_().float()  # I, flat, local
        del products
        finite = torch.isfinite(sensitivity).all().to(torch.int32)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=self.group)
        finite = finite.bool()
        self.skipped += ~finite
        # A skipped update uses weight 0 and a zeroed I: lerp(x, 0, 0) == x, the statistics stay unchanged.
        sensitivity.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        if self.ubar is None:  # plain sensitivity: keep the latest I
            torch.where(finite, sensitivity, self.ibar, out=self.ibar)
            return
        keep = finite.to(torch.float32)
        self.ibar.lerp_(sensitivity, keep * (1.0 - self.beta1))
        deviation = sensitivity.sub_(self.ibar).abs_()  # |I - Ibar| with the updated Ibar (eq. 10)
        self.ubar.lerp_(deviation, keep * (1.0 - self.beta2))

    @torch.no_grad()
    def triplet_scores(self) -> torch.Tensor:
        """Complete S for every triplet, shape ``(sum of r,)``, identical on every process (one all-reduce)."""
        if self.metric == "magnitude":
            partial = []
            for a in self.adapters:
                full = torch.zeros(a.r, dtype=torch.float32, device=self.device)
                span = _dim0_range(a.E)
                full[span.lo : span.hi] = a.E.to_local().abs().float()  # type: ignore[attr-defined]
                partial.append(full)
            scores = torch.cat(partial)
        else:
            assert self.ibar is not None
            element = self.ibar if self.ubar is None else self.ibar * self.ubar
            per_group = []
            for group in self._local_groups:
                s_p, s_e, s_q = group.views(element)
                # Partial column sums of P over the local rows; the all-reduce completes the mean over d_out.
                full = s_p.sum(dim=1) / group.d_out  # (g, r)
                full[:, group.triplets.lo : group.triplets.hi] += s_e + s_q.mean(dim=2)  # complete local terms
                per_group.append(full.reshape(-1))
            scores = torch.cat(per_group)[self._to_model_order]
        dist.all_reduce(scores, op=dist.ReduceOp.SUM, group=self.group)
        return scores


def make_tracker(adapters: list[SVDAdapter], metric: ImportanceMetric, beta1: float, beta2: float) -> ImportanceTracker:
    """The importance tracker that fits the adapters: sharded (FSDP2) or plain (one process, DDP)."""
    if sharded_adapters(adapters):
        return ShardedImportanceTracker(adapters, metric, beta1, beta2)
    return ImportanceTracker(adapters, metric, beta1, beta2)


@torch.no_grad()
def reapply_sharded_masks(adapters: Sequence[SVDAdapter]) -> None:
    """Zero the masked entries of each process's shard of lambda (the masks themselves are replicated)."""
    for a in adapters:
        span = _dim0_range(a.E)
        local = a.E.to_local()  # type: ignore[attr-defined]
        local.mul_(a.rank_mask[span.lo : span.hi].to(local.dtype))


@dataclass
class _Factors:
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
    full = [_Factors(a.P.full_tensor(), a.Q.full_tensor()) for a in adapters]  # type: ignore[attr-defined]
    return orthogonal_penalty(cast(Sequence[SVDAdapter], full), form)
