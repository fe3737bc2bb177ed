"""RankAllocator: importance -> budget -> masks, once per optimizer step (paper Algorithm 1).

Like an LR scheduler, the allocator is not an ``nn.Module``: it has ``step()``, ``state_dict()`` and
``load_state_dict()``; the masks themselves live in the adapters' ``rank_mask`` buffers so that
``model.state_dict()`` carries them. It holds no logger: ``step()`` returns what it did.

Step counting: the k-th call of ``step()`` (k = 0, 1, ...) is optimizer step t = k, matching PEFT's
``update_and_allocate(global_step)`` with a 0-based ``global_step``.

The allocator composes three helpers and asks them instead of knowing what they know:

- :class:`~adalora.importance.ImportanceTracker`: the statistics and triplet scores (eq. 7-11);
- a :class:`~adalora.parallel.layout.Layout`: how the adapters lie over processes (one, DDP, FSDP2, DeepSpeed ZeRO):
  the local values and gradients, how to zero masked lambdas, whether compaction is allowed, what takes the step
  hooks, the cross-process consistency check;
- :class:`~adalora.misuse.OptimizerPairing`: the optimizer's step hooks, and the misuse they reveal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import regularizer
from .compact import compact
from .config import AdaLoRAConfig
from .importance import ImportanceTracker
from .layers import find_adapters, matrix_ranks, unwrap_model
from .misuse import Misuse, OnMisuse, OptimizerPairing, no_gradient_warning, unwrap_optimizer
from .parallel import consistency_check_requested, layout_for
from .schedule import BudgetDecision, Phase, budget_at


@dataclass(frozen=True)
class Allocation:
    """One allocation: at step ``step`` the top ``budget`` triplets were kept; ``ranks`` per adapter."""

    step: int
    budget: int
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class AllocatorReport:
    """What one ``RankAllocator.step()`` did.

    Attributes:
        step: t, the 0-based optimizer step.
        phase: the schedule phase of t.
        budget: b(t).
        allocation: the new allocation if triplets were ranked and masked at this step, else None.
    """

    step: int
    phase: Phase
    budget: int
    allocation: Allocation | None


def top_b_mask(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Bool mask keeping exactly ``budget`` highest scores; ties go to the earlier position.

    The reference thresholds with ``kthvalue`` and masks ``S <= threshold``, which drops every tied
    triplet at the threshold and so can keep fewer than ``budget``; a stable sort keeps exactly ``budget``
    and breaks ties deterministically (identically on every process).

    Args:
        scores: ``(n,)`` triplet scores.
        budget: number to keep, clamped to [0, n].
    """
    budget = max(0, min(int(budget), scores.numel()))
    order = torch.argsort(scores, descending=True, stable=True)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[order[:budget]] = True
    return keep


def _check_model(config: AdaLoRAConfig, has_adapters: bool) -> None:
    """Raise ``ValueError`` for a model or configuration the allocator cannot run with, saying how to fix it."""
    if not has_adapters:
        raise ValueError("RankAllocator: the model has no AdaLoRA adapters. Call adalora.inject(model, config).")
    if config.total_steps is None:
        raise ValueError(
            "RankAllocator: config.total_steps is None. Set it to the number of optimizer steps "
            "(config.replace(total_steps=T)); the Trainer integration fills it in for you."
        )


def _check_optimizer(config: AdaLoRAConfig, optimizer: Any) -> None:
    """Raise ``ValueError`` for a setting that needs the optimizer when there is none (``optimizer``: what takes the
    step hooks, see :meth:`~adalora.parallel.layout.Layout.step_hooks`)."""
    if config.importance_timing == "before_step" and optimizer is None:
        raise ValueError(
            "RankAllocator: importance_timing='before_step' measures importance just before the optimizer "
            "updates the weights, so it needs the optimizer: RankAllocator(model, config, optimizer=opt)."
        )
    if config.compact_at_final and optimizer is None:
        raise ValueError(
            "RankAllocator: compact_at_final=True shrinks the adapters at the final allocation, and the "
            "optimizer's state must shrink with them: pass it, RankAllocator(model, config, optimizer=opt)."
        )


class RankAllocator:
    """Adaptive budget allocation over every :class:`SVDAdapter` in ``model``.

    Call :meth:`step` once per optimizer step, after ``optimizer.step()`` and before
    ``optimizer.zero_grad()``; add :meth:`regularization` to the loss (or call :meth:`add_regularization_gradient`
    before ``optimizer.step()``).

    Args:
        model: a model prepared by :func:`adalora.inject`.
        config: the configuration used for ``inject``; ``total_steps`` must be set.
        optimizer: the optimizer that trains the adapters. Optional for the default settings, required for
            ``importance_timing="before_step"`` (importance is then measured in a hook just before the
            optimizer updates the weights) and for ``compact_at_final`` (its state is sliced with the adapters).
            When given, the allocator also checks that it is stepped exactly once per optimizer step.
        on_misuse: ``"warn"`` (default) or ``"error"`` when the allocator is stepped more often or less often
            than the optimizer, or past ``total_steps``.
        check_consistency: under ``torch.distributed``, compare the allocation across all processes at every
            allocation step and raise :class:`~adalora.parallel.ConsistencyError` if they differ (one small
            all-reduce per allocation). None (default): on iff the environment variable
            ``ADALORA_CHECK_CONSISTENCY=1``. Free when off; a no-op in a single process.

    Data-parallel training (see ``adalora.parallel``): under DDP every process computes the same allocation
    from the same all-reduced gradients; ``model`` may be the DDP-wrapped model or the model inside. Adapters
    sharded by FSDP2 (``fully_shard``) keep sharded statistics and gather the triplet scores before the top-b. Under
    DeepSpeed ZeRO, pass the engine (or its optimizer): the allocator reads the gradients and adds the regulariser's
    gradient inside the engine's optimizer step, where they exist, and masks the fp32 master copies too.
    """

    def __init__(
        self,
        model: nn.Module,
        config: AdaLoRAConfig,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        on_misuse: OnMisuse = "warn",
        check_consistency: bool | None = None,
    ) -> None:
        engine, model = model, unwrap_model(model)  # DDP's "module." prefix would change every module name
        given, optimizer = optimizer, unwrap_optimizer(optimizer)
        named = find_adapters(model)
        self.misuse = Misuse(on_misuse)
        _check_model(config, bool(named))
        self.config, self.model, self.optimizer = config, model, optimizer  # compaction needs model and optimizer
        self.names = [n for n, _ in named]
        self.adapters = [a for _, a in named]
        # b(0) = init_r x n by construction of inject; not the current sum of ranks, which is smaller once a
        # checkpoint taken after compaction is resumed. n counts matrices: each expert of a fused MoE weight is one.
        matrices = sum(a.num_matrices for a in self.adapters)
        self.init_budget = config.init_r * matrices
        self.target_budget = config.target_budget(matrices)
        if not 0 < self.target_budget < self.init_budget:
            raise ValueError(
                f"RankAllocator: the target budget {self.target_budget} must lie between 1 and the initial "
                f"budget {self.init_budget} - 1 ({matrices} matrices x init_r). "
                "Lower target_total_rank/target_r or raise init_r."
            )
        self.check_consistency = consistency_check_requested(check_consistency)
        self.layout = layout_for(engine, given, self.adapters)
        if config.compact_at_final and not self.layout.supports_compaction:
            raise ValueError(
                "RankAllocator: compact_at_final=True is not supported with several processes or DeepSpeed: DDP, FSDP "
                "and ZeRO hold on to the parameters that compaction replaces. Leave it off (save_adapter still saves "
                "the adapters cut to their kept ranks)."
            )
        stepped = self.layout.step_hooks(optimizer)  # the optimizer, or what steps in its place (DeepSpeed's)
        _check_optimizer(config, stepped)
        self.tracker = ImportanceTracker(self.adapters, config.importance, config.beta1, config.beta2, self.layout)
        problem = self.layout.setup_problem(self.check_consistency)
        if problem is not None:
            self.misuse.report("setup", f"RankAllocator: {problem}")
        self._prepare_masks()
        self.step_count = 0  # number of step() calls so far = the next step's t
        self.history: list[Allocation] = []
        self.final = False  # True once the pattern is frozen (t >= T - t_f)
        self._measured_step = -1  # t whose importance was measured before the update (paper order)
        # Where the gradients vanish inside the optimizer step (DeepSpeed ZeRO), nothing a caller runs after backward
        # is guaranteed to come before that step (accelerate steps the engine inside backward): the pre-step hook then
        # adds the regulariser's gradient and reads the gradients itself, kept until step() in the reference order.
        self._held_gradients: list[torch.Tensor] | None = None
        self._step_regularization = torch.zeros((), device=self.layout.device)
        hooked = config.importance_timing == "before_step" or not self.layout.gradients_outlive_step
        before_step = self._before_optimizer_step if hooked else None
        self.pairing = OptimizerPairing(stepped, lambda: self.step_count, self.adapters, self.misuse, before_step)

    def _prepare_masks(self) -> None:
        """Buffers every allocation reuses, so that it needs no host sync to size them and no per-adapter split."""
        ranks, device = [a.rank_mask.numel() for a in self.adapters], self.layout.device
        # owner[j] = index of the adapter that triplet j (in model order) belongs to, for counting ranks.
        self._owner = torch.repeat_interleave(
            torch.arange(len(self.adapters), device=device),
            torch.tensor(ranks, device=device),
            output_size=sum(ranks),  # known here, so that no device sync is needed to size it
        )
        # An allocation's keep-mask for the rank_mask buffers, with its per-adapter views made once here: splitting
        # a fresh mask into one view per adapter at every allocation costs more than the copies themselves.
        self._keep = torch.empty(sum(ranks), dtype=torch.bool, device=device)
        self._keep_views = [
            v.view(a.rank_mask.shape) for v, a in zip(self._keep.split(ranks), self.adapters, strict=True)
        ]

    # ------------------------------------------------------------------ schedule
    @property
    def final_start(self) -> int:
        """T - t_f: the step of the forced final allocation."""
        assert self.config.total_steps is not None
        return self.config.total_steps - self.config.final_steps

    def decision(self, step: int) -> BudgetDecision:
        """The schedule's b(t), phase and allocation flag at step t."""
        cfg = self.config
        assert cfg.total_steps is not None
        return budget_at(
            step,
            init_budget=self.init_budget,
            target_budget=self.target_budget,
            warmup_steps=cfg.warmup_steps,
            final_steps=cfg.final_steps,
            total_steps=cfg.total_steps,
            mask_interval=cfg.mask_interval,
        )

    # ------------------------------------------------------------------ the step
    def step(self) -> AllocatorReport:
        """Update importance, then rank and mask triplets if the schedule says so (Algorithm 1, lines 4-8).

        In the reference order (default) the importance of step t is measured here from the adapters'
        current values and ``.grad``: the gradient of the step just taken. Outside allocation steps this
        performs no host-device synchronisation.
        """
        t = self.step_count
        self.pairing.check(t)
        decision = self.decision(t)
        # The reference measures importance strictly before T - t_f; the forced allocation at T - t_f uses
        # the statistics as they stand.
        if t < self.final_start and self.config.importance_timing == "after_step":
            self._update_importance(self._take_held_gradients() if not self.layout.gradients_outlive_step else None)
        elif t < self.final_start and self._measured_step != t:
            self.misuse.report(
                "unmeasured",
                "RankAllocator.step() ran without the optimizer step it pairs with: with "
                "importance_timing='before_step' importance is measured when the optimizer steps.",
            )
        allocation = None
        if decision.allocate and not self.final:
            allocation = self._allocate(t, decision.budget)
            if t >= self.final_start:
                self._freeze()
        elif self.final:
            self.layout.reapply_masks()
        if t >= self.config.total_steps:  # type: ignore[operator]
            self.misuse.report(
                "past_total",
                f"RankAllocator stepped past total_steps={self.config.total_steps}: the schedule assumes "
                "training ends there (the pattern stays frozen). Set total_steps to the real number of "
                "optimizer steps.",
            )
        self.step_count += 1
        return AllocatorReport(t, decision.phase, decision.budget, allocation)

    def _allocate(self, step: int, budget: int) -> Allocation:
        scores = self.tracker.triplet_scores()
        keep = top_b_mask(scores, budget)
        if self.check_consistency:
            self.layout.check_allocation(step, budget, keep, scores, self.names)
        with torch.no_grad():
            self._keep.copy_(keep)
            torch._foreach_copy_([a.rank_mask for a in self.adapters], self._keep_views)
            self.layout.mask(keep)
        # Kept triplets per adapter by a scatter-add (boolean indexing would synchronise to size its result), read
        # together with the skipped-update counter: the one host sync of an allocation step.
        kept = torch.zeros(len(self.adapters), dtype=torch.long, device=keep.device)
        kept.scatter_add_(0, self._owner, keep.long())
        *ranks, skipped = torch.cat([kept, self.tracker.skipped.view(1)]).tolist()
        allocation = Allocation(step, budget, tuple(ranks))
        self.history.append(allocation)
        if skipped:  # counted on the device, read here where the step synchronises anyway
            self.misuse.warn_once(
                "non_finite",
                f"AdaLoRA skipped {skipped} importance update(s) because some adapter gradient was NaN or inf "
                "(e.g. an fp16 overflow step); the statistics were left unchanged for those steps.",
            )
        return allocation

    def _freeze(self) -> None:
        """The final allocation: the pattern is frozen, the statistics are no longer needed."""
        self.final = True
        self.tracker.free()
        if self.config.compact_at_final:
            # Masked triplets can no longer come back, so drop them for good (the final phase then trains
            # (d_out, k)/(k, d_in) factors; outputs are unchanged).
            compact(self.model, self.optimizer)
        self.layout.freeze_masks()  # in this step, which synchronises anyway

    # ------------------------------------------------------------------ importance
    def _before_optimizer_step(self) -> None:
        """The optimizer's pre-step hook: importance in the paper's order, and where the gradients do not outlive the
        step, the regulariser's gradient and (reference order) the gradients kept for :meth:`step`."""
        if not self.layout.gradients_outlive_step:
            self._step_regularization = self._add_regularization_gradient()
        if self.config.importance_timing == "before_step":
            self.measure_importance()
        elif not self.layout.gradients_outlive_step and self.step_count < self.final_start:
            self._held_gradients = self._gradients() if self.tracker.needs_gradients else []

    def _take_held_gradients(self) -> list[torch.Tensor]:
        """The gradients the pre-step hook read for this step (once)."""
        held, self._held_gradients = self._held_gradients, None
        if held is None:
            raise RuntimeError(
                "RankAllocator.step(): the gradients of this step were never read: they exist only inside the "
                f"optimizer's step here ({type(self.layout).__name__}), and no optimizer step ran since the "
                "allocator's last step. Step the engine (engine.step(); accelerate: accelerator.backward) before "
                "allocator.step()."
            )
        return held

    def measure_importance(self) -> None:
        """With ``importance_timing="before_step"``: measure step t's importance now, before the optimizer updates
        the weights (the paper's order).

        The optimizer's pre-step hook calls it; a framework that runs the backward pass inside
        ``optimizer.step()`` (Lightning) calls it itself once the gradients exist. Once per step: later calls
        before the allocator steps do nothing.
        """
        t = self.step_count
        if t < self.final_start and self._measured_step != t:
            self._update_importance()
            self._measured_step = t

    def _update_importance(self, gradients: list[torch.Tensor] | None = None) -> None:
        """Fold a step's sensitivities into the statistics, from ``gradients`` or from those readable now."""
        if self.tracker.needs_gradients:
            self.tracker.update(self._gradients() if gradients is None else gradients)

    def _gradients(self) -> list[torch.Tensor]:
        """The local gradient of every tracked parameter; zeros for one that received none (zero sensitivity)."""
        params = self.tracker.parameters()
        grads = self.layout.gradients(params)
        missing = [i for i, g in enumerate(grads) if g is None]
        if not missing:
            return grads  # type: ignore[return-value]
        if len(missing) == len(grads):
            if self.layout.replaced(params):
                raise RuntimeError(
                    "RankAllocator.step(): the model was sharded with fully_shard after this allocator was built (or "
                    "its adapters were compacted by hand), so it tracks parameters that no longer train. Build the "
                    "optimizer and the RankAllocator after fully_shard (or after compact)."
                )
            raise RuntimeError(
                "RankAllocator.step(): no adapter parameter has a gradient. Call it after loss.backward() and "
                "optimizer.step() but before optimizer.zero_grad() (which sets gradients to None)."
            )
        # A frozen factor (the fixed lambda = 1 gate of a LoRA doublet, see baselines.py) has no sensitivity by
        # design; only trainable factors without a gradient deserve a warning.
        unexpected = sorted({self.names[self.tracker.owners[i]] for i in missing if params[i].requires_grad})
        if unexpected:
            self.misuse.warn_once("no_grad", no_gradient_warning(unexpected))
        values = self.layout.values(params)
        return [torch.zeros_like(values[i]) if g is None else g for i, g in enumerate(grads)]

    # ------------------------------------------------------------------ the regulariser
    def regularization(self) -> torch.Tensor:
        """gamma * R(P, Q) over all adapters (eq. 4), with gradient; add it to any loss.

        Raises:
            ValueError: the adapters' gradients exist only inside the optimizer step (DeepSpeed ZeRO), where the
                allocator adds the regulariser's gradient itself: in the loss it would count twice.
        """
        if self.config.orth_reg_weight == 0:
            return torch.zeros((), device=self.layout.device)
        if not self.layout.gradients_outlive_step:
            raise ValueError(
                "RankAllocator.regularization(): under DeepSpeed the allocator adds the regulariser's gradient itself, "
                "inside the engine's optimizer step; do not add regularization() to the loss."
            )
        return self.config.orth_reg_weight * regularizer.regularization(self.adapters, self.config.regularizer)

    def add_regularization_gradient(self) -> torch.Tensor:
        """Add gamma * dR/dP and dR/dQ to the adapters' ``.grad`` instead of putting R in the loss; once per step.

        The same update as ``(loss + regularization()).backward()`` contributes, in closed form and without an
        autograd graph, and independent of how a trainer scales its loss (see :mod:`adalora.regularizer`). Call it
        after the last backward pass of an optimizer step and before ``optimizer.step()`` (so before the
        ``importance_timing="before_step"`` hook: importance is then measured on the gradient of the whole
        objective, task loss + gamma * R, as with the regulariser in the loss).

        Where the gradients exist only inside the optimizer step (DeepSpeed ZeRO) the allocator adds the gradient
        itself in the step's pre-hook, once per optimizer step; this then adds nothing and returns that step's value,
        so that a loop or callback written for one process stays correct.

        Returns:
            gamma * R before the update, detached (zero when ``orth_reg_weight`` is 0).
        """
        if not self.layout.gradients_outlive_step:
            return self._step_regularization
        return self._add_regularization_gradient()

    def _add_regularization_gradient(self) -> torch.Tensor:
        weight = self.config.orth_reg_weight
        if weight == 0:
            return torch.zeros((), device=self.layout.device)
        return regularizer.add_regularization_gradient(self.adapters, weight, self.config.regularizer, self.layout)

    # ------------------------------------------------------------------ reading
    def rank_pattern(self) -> dict[str, int]:
        """{matrix name: kept rank} of the latest allocation (init rank before the first one).

        A matrix is an adapted module, or one expert of an adapted fused MoE weight, named ``<parameter>[<expert>]``
        (see :func:`adalora.layers.matrix_ranks`).
        """
        return matrix_ranks(list(zip(self.names, self.adapters, strict=True)))

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """{module name: S of its triplets}, eq. 7, from the current statistics: ``(r,)``, or ``(E, r)`` for the
        fused expert weights of an MoE block."""
        scores = self.tracker.triplet_scores().split(self.tracker.sizes)
        shaped = [s.view(a.rank_mask.shape) for s, a in zip(scores, self.adapters, strict=True)]
        return dict(zip(self.names, shaped, strict=True))

    def remove_hooks(self) -> None:
        """Detach from the optimizer (e.g. before building a new allocator for it)."""
        self.pairing.remove()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: step, statistics, masks, history, misuse counters."""
        return {
            "step_count": self.step_count,
            "final": self.final,
            "module_names": list(self.names),
            "ranks": [a.r for a in self.adapters],  # current sizes: smaller than init_r after compaction
            "masks": [a.rank_mask.detach().clone() for a in self.adapters],
            "importance": {
                k: (None if v is None else v.detach().clone()) for k, v in self.tracker.state_dict().items()
            },
            "history": [{"step": a.step, "budget": a.budget, "ranks": list(a.ranks)} for a in self.history],
            "optimizer_steps": self.pairing.optimizer_steps,
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output onto an allocator for the same adapter layout."""
        self._check_compatible(state)
        self.step_count = int(state["step_count"])
        self.final = bool(state["final"])
        self.pairing.restore(int(state["optimizer_steps"]))
        self.history = [Allocation(h["step"], h["budget"], tuple(h["ranks"])) for h in state["history"]]
        with torch.no_grad():
            for adapter, mask in zip(self.adapters, state["masks"], strict=True):
                adapter.rank_mask.copy_(mask)
        if self.final:
            self.layout.freeze_masks()
            self.tracker.free()
        else:
            self.tracker.load_state_dict(state["importance"])

    def _check_compatible(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` if ``state`` was saved for other adapters or another configuration."""
        current = [a.r for a in self.adapters]
        if list(state["module_names"]) != self.names:
            raise ValueError(
                "RankAllocator.load_state_dict: the checkpoint was saved for adapters on "
                f"{len(state['module_names'])} modules ({state['module_names'][:2]}...), but this model has "
                f"{len(self.names)} ({self.names[:2]}...); rebuild the model with the same target_modules and init_r."
            )
        if list(state["ranks"]) != current:
            raise ValueError(
                f"RankAllocator.load_state_dict: the checkpoint's adapters have ranks {state['ranks'][:6]}... but "
                f"this model's have {current[:6]}...: rebuild the model with the same target_modules and init_r, "
                "and for a checkpoint taken after compaction call adalora.compact.resize_adapters(model, saved ranks) "
                "before loading the model's state and building the allocator."
            )
        saved = AdaLoRAConfig.from_dict(state["config"])
        if saved != self.config:
            raise ValueError(
                "RankAllocator.load_state_dict: the checkpoint's config differs from this allocator's. "
                f"Saved: {saved}; current: {self.config}. Resume with the same configuration."
            )
