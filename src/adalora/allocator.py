"""RankAllocator: importance -> budget -> masks, once per optimizer step (paper Algorithm 1).

Like an LR scheduler, the allocator is not an ``nn.Module``: it has ``step()``, ``state_dict()`` and
``load_state_dict()``; the masks themselves live in the adapters' ``rank_mask`` buffers so that
``model.state_dict()`` carries them. It holds no logger: ``step()`` returns what it did.

Step counting: the k-th call of ``step()`` (k = 0, 1, ...) is optimizer step t = k, matching PEFT's
``update_and_allocate(global_step)`` with a 0-based ``global_step``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .compact import compact
from .config import AdaLoRAConfig
from .importance import ImportanceTracker, make_tracker
from .layers import SVDAdapter, find_adapters, unwrap_model
from .schedule import BudgetDecision, Phase, budget_at

OnMisuse = Literal["warn", "error"]

CHECK_ENV = "ADALORA_CHECK_CONSISTENCY"
"""Environment variable that switches the cross-process consistency check on (``1``) without code changes."""


def consistency_check_requested(flag: bool | None = None) -> bool:
    """The explicit ``flag`` if given, else whether ``ADALORA_CHECK_CONSISTENCY`` is set to a true value."""
    if flag is not None:
        return bool(flag)
    return os.environ.get(CHECK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Allocation:
    """One allocation: at step ``step`` the top ``budget`` triplets were kept; ``ranks`` per adapter."""

    step: int
    budget: int
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class StepReport:
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


# --- integrations (issue 16): optimizer wrappers. Kept to this helper and one call in __init__.
def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside wrappers that expose it as ``.optimizer`` or ``._optimizer`` (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``), however deeply nested; None stays None.

    The allocator registers step hooks on the optimizer. accelerate's wrapper subclasses ``torch.optim.Optimizer``
    without initialising it, so it has no hook registry (``AttributeError: ... _optimizer_step_post_hooks``); the
    inner optimizer's hooks fire when the wrapper steps it.

    Raises:
        TypeError: what is left after unwrapping cannot register step hooks (not an optimizer).
    """
    original = optimizer
    while optimizer is not None and not hasattr(optimizer, "_optimizer_step_post_hooks"):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            inner = getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer:
            raise TypeError(
                f"RankAllocator: optimizer is a {type(original).__name__}, which is neither a torch.optim.Optimizer "
                "nor a wrapper exposing one as .optimizer; pass the torch optimizer that trains the adapters."
            )
        optimizer = inner
    return optimizer


# --- the outer ring's checks of how training is set up (adalora.parallel registers DeepSpeed and launcher checks)
SetupCheck = Callable[[nn.Module, "torch.optim.Optimizer | None", list[SVDAdapter], bool], "tuple[str, bool] | None"]
"""``check(model as given, optimizer, adapters, check_consistency)`` -> ``(message, fatal)`` or None."""
_SETUP_CHECKS: list[SetupCheck] = []


def register_setup_check(check: SetupCheck) -> None:
    """Have every new :class:`RankAllocator` run ``check``: a fatal problem raises, another is reported as misuse."""
    if check not in _SETUP_CHECKS:
        _SETUP_CHECKS.append(check)


def _no_gradient_cause(names: list[str]) -> str:
    """The likeliest reason adapters on ``names`` got no gradient, read from the module names."""
    heads = [n for n in names if n.rsplit(".", 1)[-1] in ("lm_head", "embed_out", "output_projection")]
    if heads:
        return (
            f"{heads[0]} is a language-model head: trainers with a fused LM-head loss (TRL's SFTTrainer and "
            "DPOTrainer) compute log-probabilities from its weight directly and never call the module, so its "
            "adapter takes no part in the loss."
        )
    if any("pooler" in n for n in names):
        return "The pooler is unused when the loss reads hidden states only (e.g. BERT's pooler under a custom head)."
    return "They do not feed the loss (modules the forward pass never calls, or whose output is discarded)."


# --- end integrations


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


class RankAllocator:
    """Adaptive budget allocation over every :class:`SVDAdapter` in ``model``.

    Call :meth:`step` once per optimizer step, after ``optimizer.step()`` and before
    ``optimizer.zero_grad()``; add :meth:`regularization` to the loss.

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
    sharded by FSDP2 (``fully_shard``) keep sharded statistics and gather the triplet scores before the top-b.
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
        engine = model
        model = unwrap_model(model)  # DDP's "module." prefix would change every module name
        optimizer = unwrap_optimizer(optimizer)  # integrations (issue 16): accelerate's AcceleratedOptimizer
        named = find_adapters(model)
        self.check_consistency = consistency_check_requested(check_consistency)
        found = (check(engine, optimizer, [a for _, a in named], self.check_consistency) for check in _SETUP_CHECKS)
        problems = [problem for problem in found if problem is not None]
        for message, fatal in problems:
            if fatal:
                raise ValueError(f"RankAllocator: {message}")
        if not named:
            raise ValueError("RankAllocator: the model has no AdaLoRA adapters. Call adalora.inject(model, config).")
        if config.total_steps is None:
            raise ValueError(
                "RankAllocator: config.total_steps is None. Set it to the number of optimizer steps "
                "(config.replace(total_steps=T)); the Trainer integration fills it in for you."
            )
        if config.importance_timing == "before_step" and optimizer is None:
            raise ValueError(
                "RankAllocator: importance_timing='before_step' measures importance just before the optimizer "
                "updates the weights, so it needs the optimizer: RankAllocator(model, config, optimizer=opt)."
            )
        if on_misuse not in ("warn", "error"):
            raise ValueError(f"RankAllocator: on_misuse must be 'warn' or 'error', got {on_misuse!r}")
        if config.compact_at_final and optimizer is None:
            raise ValueError(
                "RankAllocator: compact_at_final=True shrinks the adapters at the final allocation, and the "
                "optimizer's state must shrink with them: pass it, RankAllocator(model, config, optimizer=opt)."
            )
        self.config = config
        self.model = model  # compact_at_final compacts it at the final allocation
        self.optimizer = optimizer
        self.names = [n for n, _ in named]
        self.adapters: list[SVDAdapter] = [a for _, a in named]
        self.on_misuse = on_misuse
        # b(0) = init_r x n by construction of inject; not the current sum of ranks, which is smaller once a
        # checkpoint taken after compaction is resumed.
        self.init_budget = config.init_r * len(self.adapters)
        self.target_budget = config.target_budget(len(self.adapters))
        if not 0 < self.target_budget < self.init_budget:
            raise ValueError(
                f"RankAllocator: the target budget {self.target_budget} must lie between 1 and the initial "
                f"budget {self.init_budget} - 1 ({len(self.adapters)} adapters x init_r). "
                "Lower target_total_rank/target_r or raise init_r."
            )
        # The tracker knows how the adapters are laid out over processes (one, DDP, FSDP2); the allocator never asks.
        self.tracker: ImportanceTracker = make_tracker(self.adapters, config.importance, config.beta1, config.beta2)
        if config.compact_at_final and not self.tracker.supports_compaction:
            raise ValueError(
                "RankAllocator: compact_at_final=True is not supported with several processes: DDP and FSDP hold "
                "on to the parameters that compaction replaces. Leave it off (save_adapter still saves the "
                "adapters cut to their kept ranks)."
            )
        for message, _ in problems:  # not fatal: reported like any other misuse
            if on_misuse == "error":
                raise RuntimeError(f"RankAllocator: {message}")
            warnings.warn(f"RankAllocator: {message}", RuntimeWarning, stacklevel=2)
        # owner[j] = index of the adapter that triplet j (in model order) belongs to, for counting ranks.
        self._owner = torch.repeat_interleave(
            torch.arange(len(self.adapters), device=self.tracker.device),
            torch.tensor(self.tracker.ranks, device=self.tracker.device),
            output_size=sum(self.tracker.ranks),  # known here, so that no device sync is needed to size it
        )
        # An allocation's keep-mask for the rank_mask buffers, with its per-adapter views made once here: splitting
        # a fresh mask into one view per adapter at every allocation costs more than the copies themselves.
        self._keep = torch.empty(sum(self.tracker.ranks), dtype=torch.bool, device=self.tracker.device)
        self._keep_views = list(self._keep.split(self.tracker.ranks))
        self.step_count = 0  # number of step() calls so far = the next step's t
        self.history: list[Allocation] = []
        self.final = False  # True once the pattern is frozen (t >= T - t_f)
        self._warned: set[str] = set()
        self._optimizer_steps = 0
        self._optimizer_steps_at_last_step = 0
        self._measured_step = -1  # t whose importance was measured before the update (paper order)
        self._hooks = []
        if optimizer is not None:
            self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))
            if config.importance_timing == "before_step":
                self._hooks.append(optimizer.register_step_pre_hook(self._before_optimizer_step))

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
    def step(self) -> StepReport:
        """Update importance, then rank and mask triplets if the schedule says so (Algorithm 1, lines 4-8).

        In the reference order (default) the importance of step t is measured here from the adapters'
        current values and ``.grad``: the gradient of the step just taken. Outside allocation steps this
        performs no host-device synchronisation.
        """
        t = self.step_count
        self._check_optimizer_pairing(t)
        decision = self.decision(t)
        # The reference measures importance strictly before T - t_f; the forced allocation at T - t_f uses
        # the statistics as they stand.
        if t < self.final_start and self.config.importance_timing == "after_step":
            self._update_importance()
        elif t < self.final_start and self._measured_step != t:
            self._misuse(
                "unmeasured",
                "RankAllocator.step() ran without the optimizer step it pairs with: with "
                "importance_timing='before_step' importance is measured when the optimizer steps.",
            )

        allocation = None
        if decision.allocate and not self.final:
            allocation = self._allocate(t, decision.budget)
            if t >= self.final_start:
                self.final = True
                self.tracker.free()
                if self.config.compact_at_final:
                    # The pattern is frozen: masked triplets can no longer come back, so drop them for good
                    # (the final phase then trains (d_out, k)/(k, d_in) factors; outputs are unchanged).
                    compact(self.model, self.optimizer)
                self.tracker.freeze_masks()  # in this step, which synchronises anyway
        elif self.final:
            self.tracker.reapply_frozen_masks()
        if t >= self.config.total_steps:  # type: ignore[operator]
            self._misuse(
                "past_total",
                f"RankAllocator stepped past total_steps={self.config.total_steps}: the schedule assumes "
                "training ends there (the pattern stays frozen). Set total_steps to the real number of "
                "optimizer steps.",
            )
        self.step_count += 1
        return StepReport(t, decision.phase, decision.budget, allocation)

    def _allocate(self, step: int, budget: int) -> Allocation:
        scores = self.tracker.triplet_scores()
        keep = top_b_mask(scores, budget)
        if self.check_consistency:
            self.tracker.verify(step, budget, keep, scores, self.names)
        with torch.no_grad():
            self._keep.copy_(keep)
            torch._foreach_copy_([a.rank_mask for a in self.adapters], self._keep_views)
            self.tracker.mask(keep)
        # Kept triplets per adapter by a scatter-add (boolean indexing would synchronise to size its result), read
        # together with the skipped-update counter: the one host sync of an allocation step.
        kept = torch.zeros(len(self.adapters), dtype=torch.long, device=keep.device)
        kept.scatter_add_(0, self._owner, keep.long())
        *ranks, skipped = torch.cat([kept, self.tracker.skipped.view(1)]).tolist()
        allocation = Allocation(step, budget, tuple(ranks))
        self.history.append(allocation)
        self._warn_skipped(skipped)
        return allocation

    # ------------------------------------------------------------------ importance
    def _gradients(self) -> list[torch.Tensor]:
        params = self.tracker.parameters()
        grads = [p.grad for p in params]
        missing = [i for i, g in enumerate(grads) if g is None]
        if len(missing) == len(grads):
            if self.tracker.stale():
                raise RuntimeError(
                    "RankAllocator.step(): the model was sharded with fully_shard after this allocator was built (or "
                    "its adapters were compacted by hand), so it tracks parameters that no longer train. Build the "
                    "optimizer and the RankAllocator after fully_shard (or after compact)."
                )
            raise RuntimeError(
                "RankAllocator.step(): no adapter parameter has a gradient. Call it after loss.backward() and "
                "optimizer.step() but before optimizer.zero_grad() (which sets gradients to None)."
            )
        if missing:
            # A frozen factor (the fixed lambda = 1 gate of a LoRA doublet, see baselines.py) has no
            # sensitivity by design; only trainable factors without a gradient deserve a warning.
            unexpected = [i for i in missing if params[i].requires_grad]
            if unexpected and "no_grad" not in self._warned:
                owners = sorted({self.names[self._owner_index(params[i])] for i in unexpected})
                self._warn_once(
                    "no_grad",
                    f"AdaLoRA adapters received no gradient and count as unimportant (zero sensitivity): "
                    f"{', '.join(owners[:6])}{' ...' if len(owners) > 6 else ''}. {_no_gradient_cause(owners)} "
                    "Drop them from target_modules.",
                )
            grads = [torch.zeros_like(params[i]) if g is None else g for i, g in enumerate(grads)]
        return grads  # type: ignore[return-value]

    def _owner_index(self, param: torch.Tensor) -> int:
        for i, a in enumerate(self.adapters):
            if any(param is p for p in a.adapter_parameters()):
                return i
        raise KeyError("parameter does not belong to a tracked adapter")

    def _update_importance(self) -> None:
        if self.tracker.needs_gradients:
            self.tracker.update(self._gradients())

    def _warn_skipped(self, skipped: int) -> None:
        """Report non-finite updates (counted on the device, read at allocation steps, which synchronise anyway)."""
        if skipped and "non_finite" not in self._warned:
            self._warn_once(
                "non_finite",
                f"AdaLoRA skipped {skipped} importance update(s) because some adapter gradient was NaN or inf "
                "(e.g. an fp16 overflow step); the statistics were left unchanged for those steps.",
            )

    # ------------------------------------------------------------------ optimizer pairing
    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        t = self.step_count
        if t < self.final_start and self._measured_step != t:
            self._update_importance()
            self._measured_step = t

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._optimizer_steps += 1
        lag = self._optimizer_steps - self.step_count
        if lag >= 2:
            self._misuse(
                "lagging",
                f"The optimizer has taken {self._optimizer_steps} steps but RankAllocator.step() was called "
                f"{self.step_count} times: call it after every optimizer step, or the budget schedule "
                "and importance scores fall behind (nothing gets pruned on time).",
            )

    def _check_optimizer_pairing(self, t: int) -> None:
        if not self._hooks:
            return
        if self._optimizer_steps == self._optimizer_steps_at_last_step and t > 0:
            # No optimizer step since the last call: either one call per micro-batch (misuse) or a step
            # that a GradScaler skipped after an overflow (legitimate; its gradients are non-finite).
            # Read from the adapters, not the tracker: compact() replaces the parameters in the final phase.
            grads = [p.grad for a in self.adapters for p in a.adapter_parameters() if p.grad is not None]
            overflow = bool(grads) and not bool(torch.stack(torch._foreach_max(grads)).isfinite().all())
            if not overflow:
                self._misuse(
                    "micro_batches",
                    "RankAllocator.step() was called twice without an optimizer step in between: call it once "
                    "per optimizer step, not per micro-batch (gradient accumulation).",
                )
        self._optimizer_steps_at_last_step = self._optimizer_steps

    # ------------------------------------------------------------------ reporting
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _misuse(self, key: str, message: str) -> None:
        if self.on_misuse == "error":
            raise RuntimeError(message)
        self._warn_once(key, message)

    def regularization(self) -> torch.Tensor:
        """gamma * R(P, Q) over all adapters (eq. 4); add it to any loss."""
        if self.config.orth_reg_weight == 0:
            return torch.zeros((), device=self.adapters[0].E.device)
        penalty = self.tracker.penalty(self.config.regularizer)
        return self.config.orth_reg_weight * penalty

    def add_regularization_gradient(self) -> torch.Tensor:
        """Add gamma * dR/dP and dR/dQ to the adapters' ``.grad`` instead of putting R in the loss; once per step.

        The same update as ``(loss + regularization()).backward()`` contributes, in closed form and without an
        autograd graph (see ``adalora.integrations.gradient`` for when to call it).

        Returns:
            gamma * R before the update, detached (zero when ``orth_reg_weight`` is 0).
        """
        if self.config.orth_reg_weight == 0:
            return torch.zeros((), device=self.adapters[0].E.device)
        return self.tracker.add_penalty_gradient(self.config.orth_reg_weight, self.config.regularizer)

    def rank_pattern(self) -> dict[str, int]:
        """{module name: kept rank} of the latest allocation (init rank before the first one)."""
        ranks = torch.stack([a.rank_mask.sum() for a in self.adapters]).tolist()
        return dict(zip(self.names, (int(r) for r in ranks), strict=True))

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """{module name: S of its triplets (r,)}, eq. 7, from the current statistics."""
        scores = self.tracker.triplet_scores().split(self.tracker.ranks)
        return dict(zip(self.names, scores, strict=True))

    def remove_hooks(self) -> None:
        """Detach from the optimizer (e.g. before building a new allocator for it)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

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
            "optimizer_steps": self._optimizer_steps,
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output onto an allocator for the same adapter layout."""
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
        self.step_count = int(state["step_count"])
        self.final = bool(state["final"])
        self._optimizer_steps = self._optimizer_steps_at_last_step = int(state["optimizer_steps"])
        self.history = [Allocation(h["step"], h["budget"], tuple(h["ranks"])) for h in state["history"]]
        with torch.no_grad():
            for adapter, mask in zip(self.adapters, state["masks"], strict=True):
                adapter.rank_mask.copy_(mask)
        if self.final:
            self.tracker.freeze_masks()
            self.tracker.free()
        else:
            self.tracker.load_state_dict(state["importance"])
