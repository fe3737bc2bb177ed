"""Data-parallel training: identical allocations on every process, under DDP and FSDP2.

AdaLoRA adds state that must agree across processes: the importance statistics and the masks. If two
processes kept different triplets, their replicas would silently diverge. This module holds everything the
rest of the library needs to know about ``torch.distributed``; nothing here runs (or costs anything) in a
single process.

**DDP** (``DistributedDataParallel``, ``torchrun``, ``accelerate launch``, the Trainer): identical by
construction. DDP all-reduces the gradients during ``backward()``, so after ``optimizer.step()`` every process
holds the same adapter values and the same ``.grad``; the importance statistics (eq. 8-11), the scores (eq. 7)
and the stable-sort top-b (:func:`adalora.top_b_mask`) are deterministic functions of those, so every process
computes the same masks without any communication. :func:`check_allocation_consistency` verifies it (one
all-reduce per allocation, only when asked for).

**FSDP2** (``torch.distributed.fsdp.fully_shard``): every process holds a shard (rows ``Shard(0)``) of each
P, lambda and Q and of their gradients. :class:`ShardedImportanceTracker` keeps the element statistics of the
local shard only (memory divided by the number of shards, no communication per step) and all-reduces the
partial triplet scores over the shard group at each allocation, so the global top-b sees the same complete
scores on every process. Masks are applied to the local shard of lambda.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from .config import AdaLoRAConfig, ImportanceMetric, RegularizerForm
from .importance import ImportanceTracker
from .inject import name_matches
from .layers import SVDAdapter, find_adapters, unwrap_model
from .regularizer import orthogonal_penalty

CHECK_ENV = "ADALORA_CHECK_CONSISTENCY"
"""Environment variable that switches the cross-process consistency check on (``1``) without code changes."""


class ConsistencyError(RuntimeError):
    """The processes of one training run disagree about the allocation (raised on every process at once)."""


# ---------------------------------------------------------------------- process-group awareness
def is_distributed() -> bool:
    """Whether a default process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's global rank: from the process group, else from the launcher's ``RANK``, else 0.

    The environment fallback lets code that runs before ``init_process_group`` (argument parsing, output
    directories) already know whether it is the main process under ``torchrun`` or ``accelerate launch``.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    """Number of processes: from the process group, else from the launcher's ``WORLD_SIZE``, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def get_local_world_size() -> int:
    """Processes on this machine, from the launcher's ``LOCAL_WORLD_SIZE`` (1 without a launcher)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on global rank 0 (and in a single process): the one process that writes files, logs and plots."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def mean_over_processes(value: float) -> float:
    """The mean of ``value`` over all processes (e.g. each one's loss on its share of the batch); one all-reduce."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()


def init_from_env(backend: str | None = None) -> bool:
    """Start the default process group if a launcher asked for one and nobody has started it yet.

    ``torchrun`` and ``accelerate launch`` set ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
    this reads them (``env://``). Backend: ``nccl`` when CUDA is available, else ``gloo``.

    Returns:
        True if a process group with more than one process is running after the call.
    """
    if not dist.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            # One GPU per process, chosen by the launcher's LOCAL_RANK, before NCCL binds to a device.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return is_distributed()


def consistency_check_requested(flag: bool | None = None) -> bool:
    """The explicit ``flag`` if given, else whether ``ADALORA_CHECK_CONSISTENCY`` is set to a true value."""
    if flag is not None:
        return bool(flag)
    return os.environ.get(CHECK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------- the consistency check
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
    high, low = high.cpu(), low.cpu()
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
    raise ConsistencyError(
        f"AdaLoRA allocation at step {step} differs across the {dist.get_world_size(group)} processes: "
        + "; ".join(problems)
        + ". The replicas have diverged. Usual causes: the model is not wrapped in DistributedDataParallel (or "
        "FSDP), so gradients are not averaged; processes started from different weights or seeds; the "
        "allocator stepped at different times; non-deterministic kernels on different hardware."
    )


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


# ---------------------------------------------------------------------- saving from several processes
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


def save_adapter(
    model: nn.Module, directory: str | os.PathLike[str], config: AdaLoRAConfig, metadata: dict | None = None
) -> Path | None:
    """:func:`adalora.save_adapter` for a model trained by several processes: call it on every process.

    Unwraps DDP, gathers FSDP2 shards of the adapters (:func:`gathered_adapters`), and lets rank 0 alone
    write; the others wait until the directory is complete. A failure on rank 0 (disk full, bad path) is
    raised on every process, so none is left waiting. In a single process it is :func:`adalora.save_adapter`.

    Returns:
        The adapter directory on rank 0, None on the other processes.
    """
    from .io import save_adapter as save  # io imports much of the package; keep this module light to import

    model = unwrap_model(model)
    with gathered_adapters(model, config):
        if not is_distributed():
            return save(model, directory, config, metadata)
        path, failure = None, None
        if is_main_process():
            try:
                path = save(model, directory, config, metadata)
            except Exception as error:  # re-raised below, after the others have heard of it
                failure = error
        outcome = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise RuntimeError(f"save_adapter: rank 0 failed to write {directory}: {outcome[0]}")
    return path
