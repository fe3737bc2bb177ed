"""RankAllocator: importance -> budget -> masks, once per optimizer step (paper Algorithm 1).

Like an LR scheduler, the allocator is not an ``nn.Module``: it has ``step()``, ``state_dict()`` and
``load_state_dict()``; the masks themselves live in the adapters' ``rank_mask`` buffers so that
``model.state_dict()`` carries them. It holds no logger: ``step()`` returns what it did.

Step counting: the k-th call of ``step()`` (k = 0, 1, ...) is optimizer step t = k, matching PEFT's
``update_and_allocate(global_step)`` with a 0-based ``global_step``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from . import parallel as distributed
from .compact import compact
from .config import AdaLoRAConfig
from .importance import ImportanceTracker
from .layers import SVDAdapter, find_adapters, unwrap_model
from .regularizer import orthogonal_penalty
from .schedule import BudgetDecision, Phase, budget_at

OnMisuse = Literal["warn", "error"]


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


DEEPSPEED_REFUSAL = (
    "AdaLoRA does not support DeepSpeed: under ZeRO the gradients live in DeepSpeed's partitioned buffers, not in the "
    "parameters' .grad (and ZeRO-3 partitions the parameters themselves), so the importance scores would read "
    "nothing and every triplet would look unimportant. Supported: one process, DDP (torchrun / accelerate launch / "
    "the Trainer with several processes) and FSDP2 (fully_shard); see docs/scaling-out.md."
)


def deepspeed_in_use(model: Any, optimizer: Any, adapters: list[Any]) -> str | None:
    """What shows that DeepSpeed manages ``model``/``optimizer``, or None: an engine around the model, a DeepSpeed
    optimizer, or ZeRO-3 partitioned adapter parameters (``ds_id``/``ds_numel``). Read from types and attributes,
    without importing deepspeed."""

    def from_deepspeed(obj: Any) -> bool:
        return any(cls.__module__.split(".")[0] == "deepspeed" for cls in type(obj).__mro__)

    if from_deepspeed(model):
        return f"the model is a {type(model).__name__}"
    if optimizer is not None and from_deepspeed(optimizer):
        return f"the optimizer is DeepSpeed's {type(optimizer).__name__}"
    for adapter in adapters:
        for p in adapter.adapter_parameters():
            if hasattr(p, "ds_id") or hasattr(p, "ds_numel"):
                return "the adapters' parameters are partitioned by ZeRO-3 (ds_id/ds_numel)"
    return None


def launch_problem(check_consistency: bool) -> str | None:
    """What is wrong with the process setup, as seen from here, or None.

    A launcher (``torchrun``, ``accelerate launch``) sets ``WORLD_SIZE``; when it says several processes but no
    process group is running, each process trains on its own (``accelerate launch --multi_gpu`` on a machine
    without GPUs and without ``Accelerator(cpu=True)`` does this), so the allocations are never compared or
    averaged. A consistency check asked for in a single process has nothing to compare.
    """
    import os

    world = os.environ.get("WORLD_SIZE", "1")
    running = distributed.is_distributed()
    if world.isdigit() and int(world) > 1 and not running:
        return (
            f"RankAllocator: the launcher set WORLD_SIZE={world} but no torch.distributed process group with "
            "several processes is running: each process is training on its own, on its own data, and its "
            "allocation is never compared with the others'. On a CPU, build Accelerator(cpu=True) (or call "
            "torch.distributed.init_process_group('gloo')) before the model and the RankAllocator."
        )
    if check_consistency and not running:
        return (
            "RankAllocator: a consistency check was requested (check_consistency=True or ADALORA_CHECK_CONSISTENCY=1) "
            "but this is a single process: there is nothing to compare, and the check does nothing."
        )
    return None


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
            allocation step and raise :class:`~adalora.distributed.ConsistencyError` if they differ (one small
            all-reduce per allocation). None (default): on iff the environment variable
            ``ADALORA_CHECK_CONSISTENCY=1``. Free when off; a no-op in a single process.

    Data-parallel training (see ``adalora.distributed``): under DDP every process computes the same allocation
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
        deepspeed = deepspeed_in_use(engine, optimizer, [a for _, a in named])  # integrations (issue 16)
        if deepspeed is not None:
            raise ValueError(f"RankAllocator: {deepspeed}. {DEEPSPEED_REFUSAL}")
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
        self.tracker: ImportanceTracker = distributed.make_tracker(
            self.adapters, config.importance, config.beta1, config.beta2
        )
        self._sharded = isinstance(self.tracker, distributed.ShardedImportanceTracker)  # FSDP2 DTensors
        if config.compact_at_final and (self._sharded or distributed.is_distributed()):
            raise ValueError(
                "RankAllocator: compact_at_final=True is not supported with several processes: DDP and FSDP hold "
                "on to the parameters that compaction replaces. Leave it off (save_adapter still saves the "
                "adapters cut to their kept ranks)."
            )
        self.check_consistency = distributed.consistency_check_requested(check_consistency)
        problem = launch_problem(self.check_consistency)  # integrations (issue 16): independent runs
        if problem is not None:
            if on_misuse == "error":
                raise RuntimeError(problem)
            warnings.warn(problem, RuntimeWarning, stacklevel=2)
        # owner[j] = index of the adapter that triplet j (in model order) belongs to, for counting ranks.
        self._owner = torch.repeat_interleave(
            torch.arange(len(self.adapters), device=self.tracker.device),
            torch.tensor(self.tracker.ranks, device=self.tracker.device),
            output_size=sum(self.tracker.ranks),  # known here, so that no device sync is needed to size it
        )
        # An allocation's keep-mask, as bool (for the rank_mask buffers) and in lambda's dtype (to multiply lambda),
        # each with its per-adapter views made once here: splitting a fresh (sum of r,) mask into 72 views at every
        # allocation costs more (~70 us on the CPU) than the copies and products themselves.
        triplets = sum(self.tracker.ranks)
        self._keep = torch.empty(triplets, dtype=torch.bool, device=self.tracker.device)
        self._keep_views = list(self._keep.split(self.tracker.ranks))
        self._keep_factor = torch.empty(triplets, dtype=self.adapters[0].E.dtype, device=self.tracker.device)
        self._keep_factor_views = list(self._keep_factor.split(self.tracker.ranks))
        # The final phase's lambda multipliers (the frozen masks in lambda's dtype) and the lambdas they were made
        # for; set when the pattern freezes (the final allocation, or loading a final-phase state).
        self._frozen_factors: list[torch.Tensor] | None = None
        self._frozen_lambdas: list[torch.Tensor] = []
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
                self._freeze_masks()  # in this step, which synchronises anyway
        elif self.final:
            self._reapply_frozen_masks()
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
            distributed.check_allocation_consistency(step, budget, keep, scores, self.names, self.tracker.ranks)
        with torch.no_grad():
            self._keep.copy_(keep)
            torch._foreach_copy_([a.rank_mask for a in self.adapters], self._keep_views)
            self._reapply_masks(keep)
        # Kept triplets per adapter by a scatter-add (boolean indexing would synchronise to size its result), read
        # together with the skipped-update counter: the one host sync of an allocation step.
        kept = torch.zeros(len(self.adapters), dtype=torch.long, device=keep.device)
        kept.scatter_add_(0, self._owner, keep.long())
        *ranks, skipped = torch.cat([kept, self.tracker.skipped.view(1)]).tolist()
        allocation = Allocation(step, budget, tuple(ranks))
        self.history.append(allocation)
        self._warn_skipped(skipped)
        return allocation

    @torch.no_grad()
    def _reapply_masks(self, keep: torch.Tensor) -> None:
        """Zero lambda of every triplet the allocation just masked (P and Q are left alone: it can come back).

        Args:
            keep: the masks just copied into the adapters, concatenated: ``(sum of r,)`` bool. Cast to lambda's
                dtype once (0 and 1 are exact in every float dtype) instead of once per adapter.
        """
        if self._sharded:
            distributed.reapply_sharded_masks(self.adapters)
            return
        self._keep_factor.copy_(keep)
        torch._foreach_mul_([a.E for a in self.adapters], self._keep_factor_views)

    @torch.no_grad()
    def _freeze_masks(self) -> None:
        """Cast the frozen masks to lambda's dtype once for the final phase (one host sync: is anything masked?).

        ``torch._foreach_mul_`` with bool masks would cast every mask at every step, and on a GPU leave the fused
        multi-tensor kernel for one kernel per adapter. When every triplet is kept, as after compaction, there is
        nothing to zero and the final-phase steps do nothing. Sharded adapters re-mask their local shards instead.
        """
        if self._sharded:
            return
        masks = [a.rank_mask for a in self.adapters]
        factors = torch.cat(masks).to(self.adapters[0].E.dtype)
        self._frozen_factors = [] if bool(factors.all()) else list(factors.split([m.numel() for m in masks]))
        self._frozen_lambdas = [a.E for a in self.adapters]

    @torch.no_grad()
    def _reapply_frozen_masks(self) -> None:
        """Final phase: zero the masked lambdas that the optimizer step just moved, with the frozen masks.

        The cast masks are made again (one host sync) only if the adapters' parameters were replaced since the
        pattern froze (``adalora.compact`` called by hand).
        """
        if self._sharded:
            distributed.reapply_sharded_masks(self.adapters)
            return
        lambdas = [a.E for a in self.adapters]
        if self._frozen_factors is None or any(a is not b for a, b in zip(lambdas, self._frozen_lambdas, strict=True)):
            self._freeze_masks()
        if self._frozen_factors:
            torch._foreach_mul_(lambdas, self._frozen_factors)

    # ------------------------------------------------------------------ importance
    def _gradients(self) -> list[torch.Tensor]:
        params = self.tracker.parameters()
        grads = [p.grad for p in params]
        missing = [i for i, g in enumerate(grads) if g is None]
        if len(missing) == len(grads):
            if not self._sharded and distributed.is_sharded(self.adapters[0].E):
                raise RuntimeError(
                    "RankAllocator.step(): the model was sharded with fully_shard after this allocator was built, "
                    "so it tracks parameters FSDP has replaced. Build the optimizer and the RankAllocator after "
                    "fully_shard."
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
        """gamma * R(P, Q) over all adapters (section 2 of ALGORITHM.md); add it to any loss."""
        if self.config.orth_reg_weight == 0:
            return torch.zeros((), device=self.adapters[0].E.device)
        if self._sharded:
            penalty = distributed.sharded_orthogonal_penalty(self.adapters, self.config.regularizer)
        else:
            penalty = orthogonal_penalty(self.adapters, self.config.regularizer)
        return self.config.orth_reg_weight * penalty

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
                "and for a checkpoint taken after compaction call adalora.resize_adapters(model, saved ranks) "
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
        self._frozen_factors = None
        if self.final:
            self._freeze_masks()
            self.tracker.free()
        else:
            self.tracker.load_state_dict(state["importance"])
