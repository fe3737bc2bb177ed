"""Importance of every triplet (paper section 3.3, eq. 7-11), kept in flat buffers.

Element statistics, for every entry w of every adapter's P, lambda (E) and Q:

    I(w)    = |w * dL/dw|                                  sensitivity (eq. 8)
    Ibar(w) = b1 * Ibar(w) + (1 - b1) * I(w)               smoothed sensitivity (eq. 9)
    Ubar(w) = b2 * Ubar(w) + (1 - b2) * |I(w) - Ibar(w)|   uncertainty, with the updated Ibar (eq. 10)
    s(w)    = Ibar(w) * Ubar(w)                            (eq. 11)

Triplet score (eq. 7): S_i = s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij).

:data:`METRICS` is the table of element scores s (the paper's and its ablations, section 4.4); the config's
validation, the trackers and the command line's choices all read it, so a new score is one new entry.

All statistics live in (at most) two contiguous float32 buffers on the adapters' device. Adapters of equal shape
are laid out next to each other, so that each shape group's P, E and Q statistics are plain strided views of shape
``(g, p_rows, r)``, ``(g, r_local)`` and ``(g, r_local, d_in)``: one update touches every statistic with a handful
of whole-buffer operations, and scoring takes three reductions per shape group instead of a Python loop over
parameter names.

:class:`ImportanceTracker` is also the allocator's one interface to how the adapters are laid out over processes:
the allocator asks it to update, score, mask lambda, re-apply the frozen masks, compute the regulariser and check
an allocation, and never asks which kind it has. This module covers one process (and the local rows of every
tensor are the whole tensor); ``adalora.parallel`` registers trackers for replicated (DDP) and sharded (FSDP2)
adapters with :func:`register_tracker`, and :func:`make_tracker` picks the one that fits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .layers import SVDAdapter
from .regularizer import add_orthogonal_gradient, orthogonal_penalty

# ---------------------------------------------------------------------------------------------- the metrics
Fold = Callable[[list[torch.Tensor], torch.Tensor, "float | torch.Tensor", float, float], None]
ElementScores = Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ImportanceMetric:
    """One element score s(w) of eq. 7.

    Attributes:
        name: the value of ``AdaLoRAConfig.importance`` and ``--importance``.
        description: one line for the command line's help and the docs.
        statistics: float32 buffers it keeps, each the size of all adapter parameters together.
        fold: ``fold(statistics, I, keep, beta1, beta2)`` folds one step's sensitivity I into the statistics, in
            place; ``keep`` is 1 for a good step and 0 for a skipped one (which must leave them unchanged). I may
            be overwritten. None when the score needs no statistics.
        element_scores: ``element_scores(statistics, workspace)`` -> s for every element (may use ``workspace``).
            None for a score read from lambda alone.
    """

    name: str
    description: str
    statistics: int
    fold: Fold | None
    element_scores: ElementScores | None

    @property
    def needs_gradients(self) -> bool:
        return self.fold is not None

    @property
    def reads_lambda_only(self) -> bool:
        """S = |lambda|: meaningless when lambda is fixed (the LoRA baselines)."""
        return self.element_scores is None


def _fold_smoothed(stats: list[torch.Tensor], sensitivity: torch.Tensor, keep: Any, beta1: float, beta2: float) -> None:
    ibar, ubar = stats
    ibar.lerp_(sensitivity, keep * (1.0 - beta1))  # eq. 9
    deviation = sensitivity.sub_(ibar).abs_()  # |I - Ibar| with the updated Ibar (eq. 10)
    ubar.lerp_(deviation, keep * (1.0 - beta2))


def _fold_latest(stats: list[torch.Tensor], sensitivity: torch.Tensor, keep: Any, beta1: float, beta2: float) -> None:
    stats[0].lerp_(sensitivity, keep)  # lerp with weight 1 is an exact copy, with weight 0 a no-op


METRICS: dict[str, ImportanceMetric] = {
    m.name: m
    for m in (
        ImportanceMetric(
            "smoothed",
            "the paper's score: sensitivity |w dL/dw| smoothed by an EMA (beta1) times its uncertainty "
            "(EMA beta2), eq. 8-11",
            2,
            _fold_smoothed,
            lambda stats, workspace: torch.mul(stats[0], stats[1], out=workspace),
        ),
        ImportanceMetric(
            "sensitivity",
            "the sensitivity |w dL/dw| alone, eq. 8 (ablation of section 4.4)",
            1,
            _fold_latest,
            lambda stats, workspace: stats[0],
        ),
        ImportanceMetric(
            "magnitude", "the singular value |lambda| alone, no gradients (ablation of section 4.4)", 0, None, None
        ),
    )
}


def importance_metric(name: str) -> ImportanceMetric:
    """The :data:`METRICS` entry called ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in METRICS:
        raise ValueError(f"unknown importance metric {name!r}; choose one of {', '.join(METRICS)}")
    return METRICS[name]


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class _ShapeGroup:
    """Adapters sharing (d_out, d_in, r); offsets index the flat statistics buffers.

    A process holds rows ``0:p_rows`` of each P and triplets ``lo:hi`` of each lambda and Q: all of them in one
    process, its shard under FSDP2 (equal global shapes shard identically, so the group's members share them).
    """

    members: tuple[int, ...]  # adapter indices, in model order
    d_out: int  # global rows of P (the mean in eq. 7 divides by it)
    d_in: int
    r: int  # global number of triplets
    p_rows: int
    lo: int
    hi: int
    p_offset: int
    e_offset: int
    q_offset: int

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Statistics as ``(g, p_rows, r)``, ``(g, r_local)`` and ``(g, r_local, d_in)``."""
        g, r_local = len(self.members), self.hi - self.lo
        p = flat[self.p_offset : self.p_offset + g * self.p_rows * self.r].view(g, self.p_rows, self.r)
        e = flat[self.e_offset : self.e_offset + g * r_local].view(g, r_local)
        q = flat[self.q_offset : self.q_offset + g * r_local * self.d_in].view(g, r_local, self.d_in)
        return p, e, q


def _views_like(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views of ``flat`` shaped like ``tensors`` (float32 whatever their dtype)."""
    views, offset = [], 0
    for t in tensors:
        views.append(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return views


# ---------------------------------------------------------------------------------------------- the tracker
class ImportanceTracker:
    """Element statistics, triplet scores and masking for a fixed list of adapters in one process.

    Args:
        adapters: the adapters, in the order triplet scores are returned.
        metric: the name of a :data:`METRICS` entry.
        beta1: EMA factor of Ibar.
        beta2: EMA factor of Ubar.

    Attributes:
        supports_compaction: whether ``compact`` may replace the adapters' parameters during training (not when
            DDP or FSDP hold on to them).
        per_process_state: whether :meth:`state_dict` differs between processes (sharded statistics: each process
            saves its own).
    """

    supports_compaction = True
    per_process_state = False

    def __init__(self, adapters: list[SVDAdapter], metric: str, beta1: float, beta2: float) -> None:
        if not adapters:
            raise ValueError(f"{type(self).__name__} needs at least one adapter")
        self.adapters = adapters
        self.metric = importance_metric(metric)
        self.beta1, self.beta2 = beta1, beta2
        self.device = self._common_device(adapters)
        self.ranks = [a.r for a in adapters]

        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, a in enumerate(adapters):
            groups.setdefault((a.d_out, a.d_in, a.r), []).append(i)
        self.groups: list[_ShapeGroup] = []
        params: list[torch.nn.Parameter] = []
        offset = 0
        for (d_out, d_in, r), members in groups.items():
            first = adapters[members[0]]
            p_rows, lo, hi = self._local_rows(first)
            g, r_local = len(members), hi - lo
            p_off, e_off = offset, offset + g * p_rows * r
            q_off = e_off + g * r_local
            offset = q_off + g * r_local * d_in
            self.groups.append(_ShapeGroup(tuple(members), d_out, d_in, r, p_rows, lo, hi, p_off, e_off, q_off))
            # Parameters listed in buffer order, so that concatenating them lays out the flat buffer.
            params += [adapters[i].P for i in members]
            params += [adapters[i].E for i in members]
            params += [adapters[i].Q for i in members]
        self.numel = offset
        self._params = params

        # Position of each adapter's triplets in the concatenation of per-group scores.
        starts = [0]
        for r in self.ranks:
            starts.append(starts[-1] + r)
        order = torch.empty(sum(self.ranks), dtype=torch.long)
        position = 0
        for group in self.groups:
            for i in group.members:
                order[starts[i] : starts[i + 1]] = torch.arange(position, position + group.r)
                position += group.r
        self._to_model_order = order.to(self.device)

        zeros = (torch.zeros(self.numel, dtype=torch.float32, device=self.device) for _ in range(2))
        self.stats: list[torch.Tensor] = [next(zeros) for _ in range(self.metric.statistics)]
        # Scratch for I: kept between steps because a fresh 4-bytes-per-parameter allocation every step costs
        # more than the whole update on CPU (page faults); freed with the statistics.
        self._workspace: torch.Tensor | None = (
            torch.empty(self.numel, dtype=torch.float32, device=self.device) if self.stats else None
        )
        self._workspace_views = [] if self._workspace is None else _views_like(self._workspace, self._values())
        # Count of updates skipped for non-finite gradients; a device tensor so that no step syncs.
        self.skipped = torch.zeros((), dtype=torch.long, device=self.device)
        # An allocation's keep-mask in lambda's dtype, with its per-adapter views made once: splitting a fresh
        # mask into one view per adapter at every allocation costs more than the products themselves.
        self._keep_factor = torch.empty(sum(self.ranks), dtype=adapters[0].E.dtype, device=self.device)
        self._keep_factor_views = list(self._keep_factor.split(self.ranks))
        # The final phase's lambda multipliers (the frozen masks in lambda's dtype) and the lambdas they were made
        # for; set by freeze_masks.
        self._frozen_factors: list[torch.Tensor] | None = None
        self._frozen_lambdas: list[torch.Tensor] = []

    # ------------------------------------------------------------------ layout hooks (overridden per layout)
    @staticmethod
    def _common_device(adapters: Sequence[SVDAdapter]) -> torch.device:
        devices = {a.E.device for a in adapters}
        if len(devices) > 1:
            raise ValueError(
                f"AdaLoRA adapters are spread over several devices ({sorted(map(str, devices))}); the global "
                "allocation needs them on one device. Move the model to a single device before training."
            )
        return devices.pop()

    def _local_rows(self, adapter: SVDAdapter) -> tuple[int, int, int]:
        """(rows of P, first triplet, end triplet) held by this process: all of them."""
        return adapter.d_out, 0, adapter.r

    def _values(self) -> list[torch.Tensor]:
        """The local values of the tracked parameters, in buffer order."""
        return self._params

    def _local(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The local part of each gradient."""
        return grads

    def _agree(self, finite: torch.Tensor) -> torch.Tensor:
        """Whether every process's sensitivities are finite (one process: its own flag)."""
        return finite

    # ------------------------------------------------------------------ the interface
    @property
    def needs_gradients(self) -> bool:
        return self.metric.needs_gradients

    @property
    def ibar(self) -> torch.Tensor | None:
        """Ibar (smoothed) or the latest I (sensitivity); None without statistics or once freed."""
        return self.stats[0] if self.stats else None

    @property
    def ubar(self) -> torch.Tensor | None:
        return self.stats[1] if len(self.stats) > 1 else None

    def parameters(self) -> list[torch.nn.Parameter]:
        """The tracked parameters in buffer order (P's, E's, Q's of each shape group)."""
        return self._params

    def stale(self) -> bool:
        """Whether the adapters' parameters were replaced after this tracker was built (by ``compact`` called by
        hand, or by sharding the model afterwards): its statistics then belong to the old ones."""
        current = {id(p) for a in self.adapters for p in a.adapter_parameters()}
        return any(id(p) not in current for p in self._params)

    # ------------------------------------------------------------------ update (eq. 8-10)
    @torch.no_grad()
    def update(self, grads: list[torch.Tensor]) -> None:
        """Fold one step's sensitivities into the statistics.

        Args:
            grads: one gradient per tracked parameter, in :meth:`parameters` order (zeros for a
                parameter that received none). If any entry of any w * dL/dw is NaN or inf the whole
                update is skipped (counted in ``skipped``), without a host-device synchronisation.
        """
        fold = self.metric.fold
        if fold is None or not self.stats or self._workspace is None:
            return
        sensitivity = self._workspace
        # I = |w * g| for every tracked entry, written straight into the flat workspace through per-parameter
        # views (two multi-tensor passes, no allocation; parameters are listed in buffer order).
        torch._foreach_copy_(self._workspace_views, self._values())
        torch._foreach_mul_(self._workspace_views, self._local(grads))
        sensitivity.abs_()
        # The sum of |w g| is finite iff every entry is (or it overflows float32, equally unusable).
        finite = self._agree(torch.isfinite(sensitivity.sum()))
        keep: float | torch.Tensor  # EMA weight multiplier: 1 for a good step, 0 for a skipped one
        if sensitivity.device.type == "cpu":
            # Reading a CPU scalar synchronises nothing: skip a bad step outright and save two passes.
            if not bool(finite):
                self.skipped += 1
                return
            keep = 1.0
        else:
            # No host sync on an accelerator: a bad step gets weight 0 and a zeroed I, so lerp leaves the
            # statistics bit-identical without anyone reading the flag.
            self.skipped += ~finite
            sensitivity.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            keep = finite.to(torch.float32)
        fold(self.stats, sensitivity, keep, self.beta1, self.beta2)

    # ------------------------------------------------------------------ scores (eq. 7, 11)
    def _element_scores(self) -> torch.Tensor:
        scores = self.metric.element_scores
        assert scores is not None and self.stats and self._workspace is not None, "statistics were freed"
        return scores(self.stats, self._workspace)

    @torch.no_grad()
    def triplet_scores(self) -> torch.Tensor:
        """S for every triplet of every adapter, concatenated in adapter order: shape ``(sum of r,)``."""
        if self.metric.reads_lambda_only:
            return torch.cat([a.E.detach().abs().float() for a in self.adapters])
        element = self._element_scores()
        per_group = []
        for group in self.groups:
            s_p, s_e, s_q = group.views(element)
            per_group.append((s_e + s_p.mean(dim=1) + s_q.mean(dim=2)).reshape(-1))
        return torch.cat(per_group)[self._to_model_order]

    # ------------------------------------------------------------------ masks
    @torch.no_grad()
    def mask(self, keep: torch.Tensor) -> None:
        """Zero lambda of every triplet an allocation just masked (P and Q are left alone: it can come back).

        Args:
            keep: the allocation's masks (already copied into the adapters' ``rank_mask``), concatenated:
                ``(sum of r,)`` bool. Cast to lambda's dtype once (0 and 1 are exact in every float dtype).
        """
        self._keep_factor.copy_(keep)
        torch._foreach_mul_([a.E for a in self.adapters], self._keep_factor_views)

    @torch.no_grad()
    def freeze_masks(self) -> None:
        """Cast the frozen masks to lambda's dtype once for the final phase (one host sync: is anything masked?).

        ``torch._foreach_mul_`` with bool masks would cast every mask at every step, and on a GPU leave the fused
        multi-tensor kernel for one kernel per adapter. When every triplet is kept, as after compaction, there is
        nothing to zero and the final-phase steps do nothing.
        """
        masks = [a.rank_mask for a in self.adapters]
        factors = torch.cat(masks).to(self.adapters[0].E.dtype)
        self._frozen_factors = [] if bool(factors.all()) else list(factors.split([m.numel() for m in masks]))
        self._frozen_lambdas = [a.E for a in self.adapters]

    @torch.no_grad()
    def reapply_frozen_masks(self) -> None:
        """Final phase: zero the masked lambdas that the optimizer step just moved, with the frozen masks.

        The cast masks are made again (one host sync) only if the adapters' parameters were replaced since the
        pattern froze (``adalora.compact`` called by hand).
        """
        lambdas = [a.E for a in self.adapters]
        if self._frozen_factors is None or any(a is not b for a, b in zip(lambdas, self._frozen_lambdas, strict=True)):
            self.freeze_masks()
        if self._frozen_factors:
            torch._foreach_mul_(lambdas, self._frozen_factors)

    # ------------------------------------------------------------------ the regulariser, checks
    def penalty(self, form: str) -> torch.Tensor:
        """R(P, Q) over the adapters (see :func:`adalora.regularizer.orthogonal_penalty`), with gradient."""
        return orthogonal_penalty(self.adapters, form)  # type: ignore[arg-type]

    def add_penalty_gradient(self, weight: float, form: str) -> torch.Tensor:
        """Add ``weight * dR/dP, dR/dQ`` to the adapters' ``.grad`` in closed form; returns ``weight * R``, detached."""
        return add_orthogonal_gradient(self.adapters, weight, form)  # type: ignore[arg-type]

    def verify(self, step: int, budget: int, keep: torch.Tensor, scores: torch.Tensor, names: Sequence[str]) -> None:
        """Check an allocation against the other processes' (nothing to compare with in one process)."""

    def free(self) -> None:
        """Drop the statistics and the workspace (the allocation is final; they are no longer needed)."""
        self.stats = []
        self._workspace = None
        self._workspace_views = []

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {"ibar": self.ibar, "ubar": self.ubar, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        saved = [state.get("ibar"), state.get("ubar")]
        if all(value is None for value in saved):
            self.free()
        else:
            for index, (name, value) in enumerate(zip(("ibar", "ubar"), saved, strict=True)):
                current = self.stats[index] if index < len(self.stats) else None
                if value is None and current is None:
                    continue
                if value is None or current is None or value.shape != current.shape:
                    raise ValueError(
                        f"importance statistics '{name}' have shape {None if value is None else tuple(value.shape)} "
                        f"but this model's adapters need {None if current is None else tuple(current.shape)}: the "
                        "checkpoint was saved for another model, adapter layout or importance metric."
                    )
                current.copy_(value)
        skipped = state.get("skipped")
        if skipped is not None:
            self.skipped.copy_(skipped)


# ---------------------------------------------------------------------------------------------- choosing one
TrackerFactory = Callable[[list[SVDAdapter], str, float, float], "ImportanceTracker | None"]
_FACTORIES: list[TrackerFactory] = []


def register_tracker(factory: TrackerFactory) -> None:
    """Let :func:`make_tracker` offer ``factory`` the adapters first (it returns a tracker, or None to pass)."""
    if factory not in _FACTORIES:
        _FACTORIES.insert(0, factory)


def make_tracker(adapters: list[SVDAdapter], metric: str, beta1: float, beta2: float) -> ImportanceTracker:
    """The tracker that fits how the adapters are laid out: the first registered factory that takes them, else the
    one-process :class:`ImportanceTracker`."""
    for factory in _FACTORIES:
        tracker = factory(adapters, metric, beta1, beta2)
        if tracker is not None:
            return tracker
    return ImportanceTracker(adapters, metric, beta1, beta2)
