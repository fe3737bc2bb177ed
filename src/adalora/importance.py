"""Importance of every triplet (paper section 3.3, eq. 7-11), kept in flat buffers.

Element statistics, for every entry w of every adapter's P, lambda (E) and Q:

    I(w)    = |w * dL/dw|                                  sensitivity (eq. 8)
    Ibar(w) = b1 * Ibar(w) + (1 - b1) * I(w)               smoothed sensitivity (eq. 9)
    Ubar(w) = b2 * Ubar(w) + (1 - b2) * |I(w) - Ibar(w)|   uncertainty, with the updated Ibar (eq. 10)
    s(w)    = Ibar(w) * Ubar(w)                            (eq. 11)

Triplet score (eq. 7): S_i = s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij).

All statistics live in (at most) two contiguous float32 buffers on the adapters' device. Adapters of
equal shape are laid out next to each other, so that each shape group's P, E and Q statistics are
plain strided views of shape ``(g, d_out, r)``, ``(g, r)`` and ``(g, r, d_in)``: one update touches
every statistic with a handful of whole-buffer operations, and scoring takes three reductions per
shape group instead of a Python loop over parameter names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ImportanceMetric
from .layers import SVDAdapter


@dataclass(frozen=True)
class _ShapeGroup:
    """Adapters sharing (d_out, d_in, r); offsets index the flat statistics buffers."""

    members: tuple[int, ...]  # adapter indices, in model order
    d_out: int
    d_in: int
    r: int
    p_offset: int
    e_offset: int
    q_offset: int

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = len(self.members)
        p = flat[self.p_offset : self.p_offset + g * self.d_out * self.r].view(g, self.d_out, self.r)
        e = flat[self.e_offset : self.e_offset + g * self.r].view(g, self.r)
        q = flat[self.q_offset : self.q_offset + g * self.r * self.d_in].view(g, self.r, self.d_in)
        return p, e, q


def _views_like(flat: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Consecutive views of ``flat`` shaped like ``params`` (float32 whatever the parameters' dtype)."""
    views, offset = [], 0
    for p in params:
        views.append(flat[offset : offset + p.numel()].view(p.shape))
        offset += p.numel()
    return views


class ImportanceTracker:
    """Element statistics and triplet scores for a fixed list of adapters.

    Args:
        adapters: the adapters, in the order triplet scores are returned.
        metric: ``"smoothed"`` (Ibar * Ubar, two buffers), ``"sensitivity"`` (the latest I, one buffer) or
            ``"magnitude"`` (|lambda|, no buffer).
        beta1: EMA factor of Ibar.
        beta2: EMA factor of Ubar.
    """

    def __init__(self, adapters: list[SVDAdapter], metric: ImportanceMetric, beta1: float, beta2: float) -> None:
        if not adapters:
            raise ValueError("ImportanceTracker needs at least one adapter")
        devices = {a.E.device for a in adapters}
        if len(devices) > 1:
            raise ValueError(
                f"AdaLoRA adapters are spread over several devices ({sorted(map(str, devices))}); the global "
                "allocation needs them on one device. Move the model to a single device before training."
            )
        self.adapters = adapters
        self.metric = metric
        self.beta1, self.beta2 = beta1, beta2
        self.device = devices.pop()
        self.ranks = [a.r for a in adapters]

        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, a in enumerate(adapters):
            groups.setdefault((a.d_out, a.d_in, a.r), []).append(i)
        self.groups: list[_ShapeGroup] = []
        params: list[torch.nn.Parameter] = []
        offset = 0
        for (d_out, d_in, r), members in groups.items():
            g = len(members)
            p_off, e_off, q_off = offset, offset + g * d_out * r, offset + g * d_out * r + g * r
            offset = q_off + g * r * d_in
            self.groups.append(_ShapeGroup(tuple(members), d_out, d_in, r, p_off, e_off, q_off))
            # Parameters listed in buffer order, so that concatenating them lays out the flat buffer.
            params += [adapters[i].P for i in members]
            params += [adapters[i].E for i in members]
            params += [adapters[i].Q for i in members]
        self.numel = offset
        self._params = params

        # Position of each adapter's triplets in the concatenation of per-group scores.
        order = torch.empty(sum(self.ranks), dtype=torch.long)
        starts = [0]
        for r in self.ranks:
            starts.append(starts[-1] + r)
        position = 0
        for group in self.groups:
            for i in group.members:
                order[starts[i] : starts[i + 1]] = torch.arange(position, position + group.r)
                position += group.r
        self._to_model_order = order.to(self.device)

        buffers = {"smoothed": 2, "sensitivity": 1, "magnitude": 0}[metric]
        zeros = (torch.zeros(self.numel, dtype=torch.float32, device=self.device) for _ in range(buffers))
        self.ibar: torch.Tensor | None = next(zeros, None)  # Ibar (smoothed) or the latest I (sensitivity)
        self.ubar: torch.Tensor | None = next(zeros, None)
        # Scratch for I: kept between steps because a fresh 4-bytes-per-parameter allocation every step costs
        # more than the whole update on CPU (page faults: measured ~5x slower); freed with the statistics.
        self._workspace: torch.Tensor | None = (
            torch.empty(self.numel, dtype=torch.float32, device=self.device) if buffers else None
        )
        self._workspace_views = [] if self._workspace is None else _views_like(self._workspace, params)
        # Count of updates skipped for non-finite gradients; a device tensor so that no step syncs.
        self.skipped = torch.zeros((), dtype=torch.long, device=self.device)

    @property
    def needs_gradients(self) -> bool:
        return self.metric != "magnitude"

    def parameters(self) -> list[torch.nn.Parameter]:
        """The tracked parameters in buffer order (P's, E's, Q's of each shape group)."""
        return self._params

    # ------------------------------------------------------------------ update (eq. 8-10)
    @torch.no_grad()
    def update(self, grads: list[torch.Tensor]) -> None:
        """Fold one step's sensitivities into the statistics.

        Args:
            grads: one gradient per tracked parameter, in :meth:`parameters` order (zeros for a
                parameter that received none). If any entry of any w * dL/dw is NaN or inf the whole
                update is skipped (counted in ``skipped``), without a host-device synchronisation.
        """
        if self.ibar is None or self._workspace is None:
            return
        sensitivity = self._workspace
        # I = |w * g| for every tracked entry, written straight into the flat workspace through per-parameter
        # views (two multi-tensor passes, no allocation; parameters are listed in buffer order).
        torch._foreach_copy_(self._workspace_views, self._params)
        torch._foreach_mul_(self._workspace_views, grads)
        sensitivity.abs_()
        # The sum of |w g| is finite iff every entry is (or it overflows float32, equally unusable).
        finite = torch.isfinite(sensitivity.sum())
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
        if self.ubar is None:  # plain sensitivity: keep the latest I (lerp with weight 1 is an exact copy)
            self.ibar.lerp_(sensitivity, keep)
            return
        self.ibar.lerp_(sensitivity, keep * (1.0 - self.beta1))
        deviation = sensitivity.sub_(self.ibar).abs_()  # |I - Ibar| with the updated Ibar (eq. 10)
        self.ubar.lerp_(deviation, keep * (1.0 - self.beta2))

    # ------------------------------------------------------------------ scores (eq. 7, 11)
    @torch.no_grad()
    def triplet_scores(self) -> torch.Tensor:
        """S for every triplet of every adapter, concatenated in adapter order: shape ``(sum of r,)``."""
        if self.metric == "magnitude":
            return torch.cat([a.E.detach().abs().float() for a in self.adapters])
        assert self.ibar is not None
        element = self.ibar if self.ubar is None else torch.mul(self.ibar, self.ubar, out=self._workspace)
        per_group = []
        for group in self.groups:
            s_p, s_e, s_q = group.views(element)
            per_group.append((s_e + s_p.mean(dim=1) + s_q.mean(dim=2)).reshape(-1))
        return torch.cat(per_group)[self._to_model_order]

    def free(self) -> None:
        """Drop the statistics and the workspace (the allocation is final; they are no longer needed)."""
        self.ibar = self.ubar = self._workspace = None
        self._workspace_views = []

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {"ibar": self.ibar, "ubar": self.ubar, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        for name in ("ibar", "ubar"):
            value = state.get(name)
            current = getattr(self, name)
            if value is None:
                setattr(self, name, None)
                continue
            if current is None or value.shape != current.shape:
                raise ValueError(
                    f"importance statistics '{name}' have shape {tuple(value.shape)} but this model's adapters "
                    f"need {None if current is None else tuple(current.shape)}: the checkpoint was saved for "
                    "another model, adapter layout or importance metric."
                )
            current.copy_(value)
        skipped = state.get("skipped")
        if skipped is not None:
            self.skipped.copy_(skipped)
