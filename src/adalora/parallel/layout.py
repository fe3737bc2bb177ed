"""How the adapters' tensors lie over processes: the one thing the algorithm asks about parallelism.

The importance tracker and the allocator never ask which kind of training runs. They ask a :class:`Layout` for
the rows of each tensor this process holds, the local values and gradients, whether every process saw finite
sensitivities, the complete triplet scores from each process's partial ones, how to zero the masked lambdas, whether
compaction is allowed, whether the allocator's state differs between processes, and to check an allocation
against the other processes'. :class:`Layout` itself answers for one process holding every tensor;
:class:`ReplicatedLayout` for DDP; ``adalora.parallel.sharded.ShardedLayout`` for FSDP2. ``adalora.parallel.LAYOUTS``
lists them and :func:`adalora.parallel.layout_for` picks one. ``adalora.parallel.zero.ZeroLayout`` answers for
DeepSpeed ZeRO, where the gradients exist only until the optimizer steps and are written through DeepSpeed's API.

Tensors are read along dim 0 only (the dimension FSDP2 shards), so nothing here assumes that P and Q are 2-D.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..layers import SVDAdapter
from .consistency import check_allocation_consistency
from .launch import launch_problem
from .processes import is_distributed


class Layout:
    """One process holds every adapter tensor whole, on one device.

    Args:
        adapters: the adapters, in model order (the order of triplet scores and masks).

    Attributes:
        supports_compaction: whether ``compact`` may replace the adapters' parameters during training (not when
            DDP, FSDP or DeepSpeed hold on to them).
        per_process_state: whether the allocator's state differs between processes (sharded statistics: each
            process saves its own).
        gradients_outlive_step: whether the gradients can still be read after the optimizer step (until
            ``zero_grad``). Where they cannot (DeepSpeed clears them inside its step), the allocator reads them and
            adds the regulariser's gradient in the step's pre-hook (see :meth:`step_hooks`).
        device: where the adapters' tensors (their local parts) live.
    """

    supports_compaction = True
    per_process_state = False
    gradients_outlive_step = True

    def __init__(self, adapters: Sequence[SVDAdapter]) -> None:
        if not adapters:
            raise ValueError(f"{type(self).__name__} needs at least one adapter")
        self.adapters = list(adapters)
        self.device = self._device()
        # An allocation's keep-mask in lambda's dtype, with its per-adapter views made once: splitting a fresh mask
        # into one view per adapter at every allocation costs more than the products themselves.
        # Sized from rank_mask, which is always whole (ZeRO-3 empties lambda outside the forward) and shaped like
        # lambda ((E, r) for fused MoE experts).
        masks = [a.rank_mask for a in self.adapters]
        self._keep_factor = torch.empty(
            sum(m.numel() for m in masks), dtype=self.adapters[0].E.dtype, device=self.device
        )
        split = self._keep_factor.split([m.numel() for m in masks])
        self._keep_views = [v.view(m.shape) for v, m in zip(split, masks, strict=True)]
        # The final phase's lambda multipliers (the frozen masks in lambda's dtype) and the lambdas they were made
        # for; set by freeze_masks.
        self._frozen_factors: list[torch.Tensor] | None = None
        self._frozen_lambdas: list[torch.Tensor] = []

    @classmethod
    def applies(cls, model: Any, optimizer: Any, adapters: Sequence[SVDAdapter]) -> bool:
        """Whether this layout is how ``adapters`` are trained (the default: always)."""
        return True

    @classmethod
    def for_training(cls, model: Any, optimizer: Any, adapters: Sequence[SVDAdapter]) -> Layout:
        """The layout of ``adapters`` trained as ``model`` by ``optimizer`` (both as given to the allocator)."""
        return cls(adapters)

    def step_hooks(self, optimizer: torch.optim.Optimizer | None) -> Any:
        """What steps once per optimizer step and takes step hooks (``register_step_pre_hook`` and
        ``register_step_post_hook``, as a torch optimizer): ``optimizer`` itself, the torch optimizer inside any
        wrappers (None: nothing to pair with)."""
        return optimizer

    def _device(self) -> torch.device:
        devices = {a.E.device for a in self.adapters}
        if len(devices) > 1:
            raise ValueError(
                f"AdaLoRA adapters are spread over several devices ({sorted(map(str, devices))}); the global "
                "allocation needs them on one device. Move the model to a single device before training."
            )
        return devices.pop()

    # ------------------------------------------------------------------ reading: what importance needs
    def rows(self, tensor: torch.Tensor) -> range:
        """The rows (indices along dim 0 of the full tensor) this process holds: all of them."""
        return range(tensor.shape[0])

    def values(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The local values of ``params`` (shaped by :meth:`rows`), re-read at every call."""
        return list(params)

    def gradients(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """The local gradients of ``params``, None where a parameter has none."""
        return [p.grad for p in params]

    def all_finite(self, finite: torch.Tensor) -> torch.Tensor:
        """Whether every process's sensitivities are finite, from this process's 0-dim bool ``finite``."""
        return finite

    def sum_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Complete triplet scores from each process's partial ones (here already complete), in place."""
        return scores

    @torch.no_grad()
    def add_gradients(self, params: Sequence[torch.Tensor], updates: Sequence[torch.Tensor]) -> None:
        """``p.grad += u`` for every pair (one multi-tensor add); a ``.grad`` that is None becomes a copy of ``u``.

        Args:
            params: the parameters.
            updates: what to add to their gradients, one tensor shaped like each :meth:`values` entry.
        """
        existing = [(p.grad, u) for p, u in zip(params, updates, strict=True) if p.grad is not None]
        if existing:
            grads, adds = zip(*existing, strict=True)
            torch._foreach_add_(list(grads), list(adds))
        for p, u in zip(params, updates, strict=True):
            if p.grad is None:
                p.grad = u.clone()

    def replaced(self, params: Sequence[torch.Tensor]) -> bool:
        """Whether ``params`` are no longer the adapters' own (``compact`` called by hand, or the model sharded
        after the tracker was built): statistics kept for them would belong to parameters that no longer train."""
        current = {id(p) for a in self.adapters for p in a.adapter_parameters()}
        return any(id(p) not in current for p in params)

    # ------------------------------------------------------------------ writing: what allocation needs
    @torch.no_grad()
    def mask(self, keep: torch.Tensor) -> None:
        """Zero lambda of every triplet an allocation just masked (P and Q are left alone: it can come back).

        Args:
            keep: the allocation's masks (already copied into the adapters' ``rank_mask``), concatenated in model
                order: ``(sum of r,)`` bool. Cast to lambda's dtype once (0 and 1 are exact in every float dtype).
        """
        self._keep_factor.copy_(keep)
        torch._foreach_mul_([a.E for a in self.adapters], self._keep_views)

    @torch.no_grad()
    def freeze_masks(self) -> None:
        """Cast the frozen masks to lambda's dtype once for the final phase (one host sync: is anything masked?).

        ``torch._foreach_mul_`` with bool masks would cast every mask at every step, and on a GPU leave the fused
        multi-tensor kernel for one kernel per adapter. When every triplet is kept, as after compaction, there is
        nothing to zero and the final-phase steps do nothing.
        """
        masks = [a.rank_mask for a in self.adapters]
        factors = torch.cat([m.reshape(-1) for m in masks]).to(self.adapters[0].E.dtype)
        shapes = [a.E.shape for a in self.adapters]
        split = factors.split([m.numel() for m in masks])
        self._frozen_factors = [] if bool(factors.all()) else [f.view(s) for f, s in zip(split, shapes, strict=True)]
        self._frozen_lambdas = [a.E for a in self.adapters]

    @torch.no_grad()
    def reapply_masks(self) -> None:
        """Final phase: zero the masked lambdas that the optimizer step just moved, with the frozen masks.

        The cast masks are made again (one host sync) only if the adapters' parameters were replaced since the
        pattern froze (``adalora.compact`` called by hand).
        """
        lambdas = [a.E for a in self.adapters]
        if self._frozen_factors is None or any(a is not b for a, b in zip(lambdas, self._frozen_lambdas, strict=True)):
            self.freeze_masks()
        if self._frozen_factors:
            torch._foreach_mul_(lambdas, self._frozen_factors)

    # ------------------------------------------------------------------ checks
    def check_allocation(
        self, step: int, budget: int, keep: torch.Tensor, scores: torch.Tensor, names: Sequence[str]
    ) -> None:
        """Raise :class:`~.consistency.ConsistencyError` on every process if the processes disagree about this
        allocation (a no-op in one process)."""
        check_allocation_consistency(step, budget, keep, scores, names, [a.rank_mask.numel() for a in self.adapters])

    def setup_problem(self, check_consistency: bool) -> str | None:
        """What is wrong with how the processes were started, or None (see :func:`~.launch.launch_problem`)."""
        return launch_problem(check_consistency)


class ReplicatedLayout(Layout):
    """Every process holds every adapter tensor whole (DDP).

    DDP all-reduces the gradients during ``backward()``, so every process computes the same statistics, scores and
    masks without any communication (:meth:`check_allocation` verifies that they do when asked to); all that differs
    from one process is that compaction would swap parameters DDP holds on to.
    """

    supports_compaction = False  # DDP holds on to the parameters that compaction would replace

    @classmethod
    def applies(cls, model: Any, optimizer: Any, adapters: Sequence[SVDAdapter]) -> bool:
        return is_distributed()
