"""Importance of every triplet (paper section 3.3, eq. 7-11), kept in flat buffers.

The element scores s(w) are the entries of :data:`adalora.metrics.METRICS`; this module keeps their statistics
and turns them into triplet scores (eq. 7):

    S_i = s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij).

All statistics live in (at most) two contiguous float32 buffers on the adapters' device. Matrices of equal shape
are laid out next to each other, so that each shape group's P, E and Q statistics are plain strided views of shape
``(g, p_rows, r)``, ``(g, r_local)`` and ``(g, r_local, d_in)``: one update touches every statistic with a handful
of whole-buffer operations, and scoring takes three reductions per shape group instead of a Python loop over
parameter names. An adapter on the fused expert weight of an MoE block (P ``(E, d_out, r)``, lambda ``(E, r)``, Q
``(E, r, d_in)``) is E members of its group: its tensors already are E matrices laid out one after the other.

**Unrouted experts.** An expert that received no tokens in a step (or none that reached the loss) gets an all-zero
gradient in its P, lambda and Q. That is no evidence that it is unimportant, so its statistics are left where they
are until it is routed again (eq. 9-10 are applied with weight 0 for it), instead of decaying towards zero as a zero
sensitivity would make them. Groups of such members (:attr:`_ShapeGroup.routed`) come after the others in the
buffers and fold with one weight per member; the other groups fold in one pass, as before.

The statistics cover the rows of each tensor that this process holds: all of them in one process, its shard under
FSDP2. The tracker reads those rows, their values and gradients through a :class:`~adalora.parallel.layout.Layout`,
and lets it agree the finite flag and complete the scores over processes; it never asks which layout it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .layers import SVDAdapter
from .metrics import Fold, importance_metric
from .parallel.layout import Layout


@dataclass(frozen=True)
class _ShapeGroup:
    """Matrices sharing (d_out, d_in, r); offsets index the flat statistics buffers.

    This process holds rows ``p_rows`` of each P and triplets ``triplets`` of each lambda and Q: all of them in one
    process, its shard under FSDP2 (equal global shapes shard identically, so the group's members share them).
    """

    members: tuple[int, ...]  # adapter indices, in model order
    g: int  # matrices: one per adapter, one per expert of a fused-experts adapter
    routed: bool  # members are experts, which a step may leave without tokens (see the module docstring)
    d_out: int  # global rows of P (the mean in eq. 7 divides by it)
    d_in: int
    r: int  # global number of triplets
    p_rows: int
    triplets: range
    p_offset: int
    e_offset: int
    q_offset: int

    @property
    def complete(self) -> bool:
        """Whether this process holds every row of the group's tensors (then eq. 7 needs no other process)."""
        return self.p_rows == self.d_out and len(self.triplets) == self.r

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Statistics as ``(g, p_rows, r)``, ``(g, r_local)`` and ``(g, r_local, d_in)``."""
        g, r_local = self.g, len(self.triplets)
        p = flat[self.p_offset : self.p_offset + g * self.p_rows * self.r].view(g, self.p_rows, self.r)
        e = flat[self.e_offset : self.e_offset + g * r_local].view(g, r_local)
        q = flat[self.q_offset : self.q_offset + g * r_local * self.d_in].view(g, r_local, self.d_in)
        return p, e, q

    def triplet_scores(self, element: torch.Tensor) -> torch.Tensor:
        """This process's share of S (eq. 7) for the group's triplets, ``(g * r,)``, from element scores ``element``.

        Complete when the process holds every row. Otherwise P's column means are partial sums over the local rows
        and lambda's and Q's terms exist for the local triplets only (zero elsewhere): summed over the processes
        they make the complete S.
        """
        s_p, s_e, s_q = self.views(element)
        if self.complete:
            return (s_e + s_p.mean(dim=1) + s_q.mean(dim=2)).reshape(-1)
        scores = s_p.sum(dim=1) / self.d_out  # (g, r)
        scores[:, self.triplets.start : self.triplets.stop] += s_e + s_q.mean(dim=2)
        return scores.reshape(-1)

    def touched(self, grads: torch.Tensor) -> torch.Tensor:
        """Which members got any nonzero gradient: ``(g,)`` bool, from the gradients laid out like the statistics."""
        g_p, g_e, g_q = self.views(grads)
        return (g_p.count_nonzero(dim=(1, 2)) + g_e.count_nonzero(dim=1) + g_q.count_nonzero(dim=(1, 2))) > 0

    def fold(
        self,
        fold: Fold,
        stats: list[torch.Tensor],
        sensitivity: torch.Tensor,
        keep: torch.Tensor,
        betas: tuple[float, float],
    ) -> None:
        """Fold the group's part of ``sensitivity`` into ``stats`` with one weight per member, ``keep`` ``(g,)``."""
        parts = [self.views(s) for s in stats]
        shapes = ((-1, 1, 1), (-1, 1), (-1, 1, 1))  # keep broadcast over P, lambda and Q of each member
        for kind, (view, shape) in enumerate(zip(self.views(sensitivity), shapes, strict=True)):
            fold([part[kind] for part in parts], view, keep.view(shape), *betas)


def _views_like(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views of ``flat`` shaped like ``tensors`` (float32 whatever their dtype)."""
    views, offset = [], 0
    for t in tensors:
        views.append(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return views


class ImportanceTracker:
    """Element statistics and triplet scores for a fixed list of adapters.

    Args:
        adapters: the adapters, in the order triplet scores are returned.
        metric: the name of a :data:`~adalora.metrics.METRICS` entry.
        beta1: EMA factor of Ibar.
        beta2: EMA factor of Ubar.
        layout: how the adapters' tensors lie over processes; default: one process holding all of them.

    Attributes:
        sizes: the number of triplets of each adapter: r, or E * r for the fused expert weights of an MoE block.
        owners: for each tracked parameter (in :meth:`parameters` order), the index of its adapter.
        skipped: count of updates skipped for non-finite gradients, a device tensor (read it at allocations).
    """

    def __init__(
        self,
        adapters: Sequence[SVDAdapter],
        metric: str,
        beta1: float,
        beta2: float,
        layout: Layout | None = None,
    ) -> None:
        self.adapters = list(adapters)
        self.layout = layout if layout is not None else Layout(self.adapters)
        self.metric = importance_metric(metric)
        self.beta1, self.beta2 = beta1, beta2
        self.device = self.layout.device
        self.sizes = [a.rank_mask.numel() for a in self.adapters]  # triplets per adapter (r, or E * r for experts)
        self.groups, self._params, self.owners = self._lay_out()
        self._routed = [group for group in self.groups if group.routed]  # laid out last, after every other group
        values = self.layout.values(self._params)
        self.numel = sum(v.numel() for v in values)
        self._to_model_order = self._model_order().to(self.device)
        self.stats: list[torch.Tensor] = [
            torch.zeros(self.numel, dtype=torch.float32, device=self.device) for _ in range(self.metric.statistics)
        ]
        # Scratch for I: kept between steps because a fresh 4-bytes-per-parameter allocation every step costs
        # more than the whole update on CPU (page faults); freed with the statistics.
        self._workspace: torch.Tensor | None = (
            torch.empty(self.numel, dtype=torch.float32, device=self.device) if self.stats else None
        )
        self._workspace_views = [] if self._workspace is None else _views_like(self._workspace, values)
        self.skipped = torch.zeros((), dtype=torch.long, device=self.device)

    def _lay_out(self) -> tuple[list[_ShapeGroup], list[torch.nn.Parameter], list[int]]:
        """Shape groups (those of experts last), the tracked parameters in buffer order (P's, E's, Q's of each group)
        and their owners."""
        shapes: dict[tuple[int, int, int, bool], list[int]] = {}
        for i, a in enumerate(self.adapters):
            shapes.setdefault((a.d_out, a.d_in, a.r, a.rank_mask.dim() > 1), []).append(i)
        groups, params, owners, offset = [], [], [], 0
        for (d_out, d_in, r, routed), members in sorted(shapes.items(), key=lambda item: item[0][3]):
            p_rows, triplets = self._local_rows(self.adapters[members[0]], routed)
            g, r_local = sum(self.adapters[i].num_matrices for i in members), len(triplets)
            p_offset, e_offset = offset, offset + g * p_rows * r
            q_offset = e_offset + g * r_local
            offset = q_offset + g * r_local * d_in
            groups.append(
                _ShapeGroup(tuple(members), g, routed, d_out, d_in, r, p_rows, triplets, p_offset, e_offset, q_offset)
            )
            for name in ("P", "E", "Q"):  # listed in buffer order: concatenated, they lay out the flat buffer
                params += [getattr(self.adapters[i], name) for i in members]
                owners += members
        return groups, params, owners

    def _local_rows(self, adapter: SVDAdapter, routed: bool) -> tuple[int, range]:
        """(rows of each P, triplets of each lambda and Q) this process holds for the matrices of ``adapter``."""
        if routed:  # dim 0 counts experts: a process must hold them all
            if len(self.layout.rows(adapter.P)) != adapter.P.shape[0]:
                raise ValueError(
                    "AdaLoRA: the adapters of fused MoE expert weights are split over processes (FSDP2 shards them by "
                    "expert), which the importance statistics do not support. Keep the experts blocks unsharded."
                )
            return adapter.d_out, range(adapter.r)
        triplets = self.layout.rows(adapter.E)
        if self.layout.rows(adapter.Q) != triplets:
            raise ValueError("AdaLoRA: lambda and Q of an adapter are split differently over processes.")
        return len(self.layout.rows(adapter.P)), triplets

    def _model_order(self) -> torch.Tensor:
        """Position of each adapter's triplets in the concatenation of per-group scores."""
        starts = [0]
        for size in self.sizes:
            starts.append(starts[-1] + size)
        order = torch.empty(sum(self.sizes), dtype=torch.long)
        position = 0
        for group in self.groups:
            for i in group.members:
                order[starts[i] : starts[i + 1]] = torch.arange(position, position + self.sizes[i])
                position += self.sizes[i]
        return order

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

    # ------------------------------------------------------------------ update (eq. 8-10)
    @torch.no_grad()
    def update(self, grads: list[torch.Tensor]) -> None:
        """Fold one step's sensitivities into the statistics.

        Args:
            grads: the local gradient of every tracked parameter, in :meth:`parameters` order (zeros for a
                parameter that received none). If any entry of any w * dL/dw is NaN or inf (on any process) the
                whole update is skipped (counted in ``skipped``), without a host-device synchronisation.
        """
        fold = self.metric.fold
        if fold is None or not self.stats or self._workspace is None:
            return
        sensitivity = self._workspace
        # I = |g * w| for every tracked entry, written straight into the flat workspace through per-parameter
        # views (two multi-tensor passes, no allocation; parameters are listed in buffer order). The gradients go in
        # first, so that the experts' groups can see which members the step left without any (unrouted experts).
        torch._foreach_copy_(self._workspace_views, grads)
        touched = [group.touched(sensitivity) for group in self._routed]
        torch._foreach_mul_(self._workspace_views, self.layout.values(self._params))
        sensitivity.abs_()
        # The sum of |w g| is finite iff every entry is (or it overflows float32, equally unusable).
        finite = self.layout.all_finite(torch.isfinite(sensitivity.sum()))
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
        # Every group but the experts' in one pass; each experts' group with one weight per member: 0 for an expert
        # the step left without gradient, whose statistics stay as they are.
        end = self._routed[0].p_offset if self._routed else self.numel
        if end:
            fold([s[:end] for s in self.stats], sensitivity[:end], keep, self.beta1, self.beta2)
        for group, seen in zip(self._routed, touched, strict=True):
            group.fold(fold, self.stats, sensitivity, seen * keep, (self.beta1, self.beta2))

    # ------------------------------------------------------------------ scores (eq. 7, 11)
    @torch.no_grad()
    def triplet_scores(self) -> torch.Tensor:
        """S for every triplet of every adapter, concatenated in adapter order: shape ``(sum of sizes,)`` (an experts
        adapter's triplets expert by expert); the same on every process."""
        if self.metric.reads_lambda_only:
            scores = torch.cat([self._lambda_magnitudes(a) for a in self.adapters])
        else:
            element_scores = self.metric.element_scores
            assert element_scores is not None and self.stats and self._workspace is not None, "statistics were freed"
            element = element_scores(self.stats, self._workspace)
            scores = torch.cat([group.triplet_scores(element) for group in self.groups])[self._to_model_order]
        return self.layout.sum_scores(scores)

    def _lambda_magnitudes(self, adapter: SVDAdapter) -> torch.Tensor:
        """|lambda| of ``adapter``'s local triplets, in place in a zero vector over all of them: ``(size,)``."""
        local = self.layout.values([adapter.E])[0].detach().abs().float()
        if adapter.rank_mask.dim() > 1 or len(self.layout.rows(adapter.E)) == adapter.r:  # experts are never sharded
            return local.reshape(-1)
        triplets = self.layout.rows(adapter.E)
        scores = torch.zeros(adapter.r, dtype=torch.float32, device=self.device)
        scores[triplets.start : triplets.stop] = local
        return scores

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
