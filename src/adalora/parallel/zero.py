"""DeepSpeed ZeRO (stages 1, 2 and 3): the adapters' gradients, fp32 master copies and optimizer state live in
DeepSpeed's partitioned buffers, not in the parameters.

Three things differ from one process, and :class:`ZeroLayout` handles each with DeepSpeed's own API
(``deepspeed.utils.safe_get_full_grad`` and its siblings, ``deepspeed.zero.GatheredParameters``):

- **Gradients** are ZeRO's, not ``.grad``: averaged over the processes and partitioned by ``engine.backward``,
  read whole with ``safe_get_full_grad`` (one all-reduce or all-gather per tensor), and cleared inside the engine's
  step. accelerate, and so the Trainer, step the engine inside ``backward``: no caller code runs between the two.
  The layout therefore hooks the step of the optimizer the engine drives (:class:`StepHooks`; the engine calls it
  at accumulation boundaries only, after the last reduction and before anything is cleared), and the allocator
  reads the gradients and adds the regulariser's gradient there (``gradients_outlive_step = False``).
- **Values**: the optimizer updates an fp32 master copy and copies it into the module's parameters after each step
  (under ZeRO-3 those are partitioned too, and empty outside the forward pass). Importance reads the master copy
  whole (``safe_get_full_fp32_param``).
- **Masks** must reach both copies. Zeroing only the module's parameter (PEFT's ``masked_fill_``) is undone by the
  next step, which copies the master back; zeroing only the master leaves the next forward pass on the old value.
  The layout zeroes masked lambdas in the master (``safe_set_full_fp32_param``; under ZeRO-3 each process its own
  partition, ``safe_set_local_fp32_param``) and in the module (ZeRO-3: inside ``GatheredParameters(...,
  modifier_rank=0)``, which re-partitions rank 0's values on exit), at every allocation and at every step of the
  final phase.

Every process reads the same whole gradients and values (one process's fragment summed with zeros, or gathered:
exact), so each computes the same statistics, scores and masks without further communication; the statistics are
whole on every process (adapters are small). The allocator's state is therefore the same everywhere: save it from
one process (e.g. in ``engine.save_checkpoint(..., client_state=...)``).

Nothing here imports deepspeed until a :class:`ZeroLayout` is built: DeepSpeed is recognised from its types and
parameter attributes (:func:`~.launch.deepspeed_in_use`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from ..layers import QuantizedAdapter, SVDAdapter
from .launch import deepspeed_in_use, deepspeed_optimizer
from .layout import Layout

SUPPORTED = (
    "Supported under DeepSpeed: ZeRO stages 1, 2 and 3 in fp32 or bf16, without offloading, with float base layers "
    "(see docs/scaling-out.md)."
)


def is_zero_parameter(param: torch.Tensor) -> bool:
    """Whether ZeRO holds ``param``'s master copy or partitions it: ZeRO-3's ``ds_id``, ZeRO-1/2's ``_hp_mapping``
    (present, possibly None, on every parameter the ZeRO optimizer trains)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def whole(param: torch.Tensor) -> torch.Tensor:
    """``param``'s value, whole, on every process: the fp32 master copy of a parameter the ZeRO optimizer trains (one
    all-reduce or all-gather), a frozen ZeRO-3 parameter gathered, any other parameter itself. A collective for ZeRO
    parameters: every process must call it, in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(param)
    if master is not None:
        return master
    if hasattr(param, "ds_id"):  # frozen (no master copy) and partitioned
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone()
    return param


def partition_of(full: torch.Tensor, param: Any) -> torch.Tensor:
    """This process's ZeRO-3 partition of ``full``, a whole tensor shaped like ``param``: its flat elements
    ``[k n, (k + 1) n)`` with ``n`` the partition size and ``k`` this process's rank in ``param``'s partition group,
    zero-padded past the end (the last partition is padded when ``n`` does not divide the tensor).

    DeepSpeed's ``safe_set_full_fp32_param`` and ``safe_set_full_grad`` slice that way without padding, and fail on
    the last process for such tensors (a lambda of 5 triplets over 2 processes); the local setters take this.
    """
    import torch.distributed as dist

    n = param.ds_tensor.numel()
    group = getattr(param, "ds_process_group", None)
    start = dist.get_rank(group) * n
    flat = full.detach().reshape(-1)
    part = torch.zeros(n, dtype=flat.dtype, device=flat.device)
    if start < flat.numel():
        piece = flat[start : start + n]
        part[: piece.numel()] = piece
    return part


class StepHooks:
    """``register_step_pre_hook`` and ``register_step_post_hook`` for an optimizer without them (DeepSpeed's ZeRO
    optimizers are not ``torch.optim.Optimizer``\\ s): its ``step`` is wrapped on the instance, once per optimizer.

    Hooks are called as torch calls them, ``hook(optimizer, args, kwargs)``, in the order they were registered.
    """

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self._pre: OrderedDict[int, Callable[..., None]] = OrderedDict()
        self._post: OrderedDict[int, Callable[..., None]] = OrderedDict()
        original = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            for hook in list(self._pre.values()):
                hook(optimizer, args, kwargs)
            result = original(*args, **kwargs)
            for hook in list(self._post.values()):
                hook(optimizer, args, kwargs)
            return result

        optimizer.step = step

    @classmethod
    def of(cls, optimizer: Any) -> StepHooks:
        """The hooks of ``optimizer``, wrapping its ``step`` the first time (a later allocator reuses them)."""
        hooks = getattr(optimizer, "_adalora_step_hooks", None)
        if hooks is None:
            hooks = cls(optimizer)
            optimizer._adalora_step_hooks = hooks
        return hooks

    def register_step_pre_hook(self, hook: Callable[..., None]) -> RemovableHandle:
        handle = RemovableHandle(self._pre)
        self._pre[handle.id] = hook
        return handle

    def register_step_post_hook(self, hook: Callable[..., None]) -> RemovableHandle:
        handle = RemovableHandle(self._post)
        self._post[handle.id] = hook
        return handle


def unsupported(optimizer: Any, adapters: Sequence[SVDAdapter]) -> str | None:
    """What in this DeepSpeed set-up AdaLoRA does not support (yet), or None."""
    if any(getattr(optimizer, flag, False) for flag in ("cpu_offload", "offload_optimizer", "offload_param")):
        return "DeepSpeed offloading (offload_optimizer / offload_param) is not supported"
    if getattr(optimizer, "dtype", None) == torch.float16 or getattr(optimizer, "torch_autocast_gradscaler", None):
        return "DeepSpeed fp16 (its gradients are loss-scaled until its step) is not supported"
    if any(isinstance(a, QuantizedAdapter) for a in adapters):
        return "a quantized base layer (bitsandbytes, torchao) under DeepSpeed is not supported"
    if any(a.rank_mask.dim() > 1 for a in adapters):  # SVDExperts: one set of triplets per expert
        return "adapters on fused MoE expert weights under DeepSpeed are not supported (untested)"
    name = type(optimizer).__name__
    if not name.startswith("DeepSpeedZeroOptimizer"):
        return f"DeepSpeed's {name} (DeepSpeed without ZeRO, or ZeRO-1 with fp32 gradient accumulation) is unsupported"
    return None


class ZeroLayout(Layout):
    """The adapters are trained by a DeepSpeed ZeRO engine (see the module docstring).

    Args:
        adapters: the adapters, in model order.
        optimizer: the ZeRO optimizer the engine steps (``engine.optimizer``).
    """

    supports_compaction = False  # the ZeRO optimizer holds flat partitions of the parameters compaction replaces
    gradients_outlive_step = False

    def __init__(self, adapters: Sequence[SVDAdapter], optimizer: Any) -> None:
        super().__init__(adapters)
        self.optimizer = optimizer
        self.partitioned = any(hasattr(p, "ds_id") for a in self.adapters for p in a.adapter_parameters())  # ZeRO-3

    @classmethod
    def applies(cls, model: Any, optimizer: Any, adapters: Sequence[SVDAdapter]) -> bool:
        return deepspeed_in_use(model, optimizer, list(adapters)) is not None

    @classmethod
    def for_training(cls, model: Any, optimizer: Any, adapters: Sequence[SVDAdapter]) -> Layout:
        found = deepspeed_optimizer(model, optimizer)
        if found is None:
            raise ValueError(
                "RankAllocator: DeepSpeed trains these adapters, but neither its engine nor its optimizer was given. "
                "Pass the engine deepspeed.initialize (or accelerator.prepare) returned as the model, or its optimizer."
            )
        problem = unsupported(found, adapters)
        if problem is not None:
            raise ValueError(f"RankAllocator: {problem}. {SUPPORTED}")
        return cls(adapters, found)

    def step_hooks(self, optimizer: torch.optim.Optimizer | None) -> StepHooks:
        return StepHooks.of(self.optimizer)

    # ------------------------------------------------------------------ reading
    def rows(self, tensor: torch.Tensor) -> range:
        return range(getattr(tensor, "ds_shape", tensor.shape)[0])

    def values(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [whole(p) for p in params]

    def gradients(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """The whole averaged gradients: valid only between the last ``engine.backward`` of an optimizer step and
        the engine's step (the allocator reads them in the step's pre-hook)."""
        from deepspeed.utils import safe_get_full_grad

        return [safe_get_full_grad(p) if p.requires_grad else None for p in params]

    # ------------------------------------------------------------------ writing
    @torch.no_grad()
    def add_gradients(self, params: Sequence[torch.Tensor], updates: Sequence[torch.Tensor]) -> None:
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad, safe_update_full_grad_vectorized

        if self.partitioned:  # each process adds its partition of the update to its partition of the gradient
            for p, u in zip(params, updates, strict=True):
                local = safe_get_local_grad(p)
                safe_set_local_grad(p, local + partition_of(u, p).to(local.dtype))
            return
        update_of = {id(p): u for p, u in zip(params, updates, strict=True)}
        safe_update_full_grad_vectorized(list(params), lambda grad, p: grad + update_of[id(p)].to(grad.dtype))

    def mask(self, keep: torch.Tensor) -> None:
        self.reapply_masks()  # the adapters' rank_mask buffers already hold ``keep``

    def freeze_masks(self) -> None:
        """Nothing to prepare: the masks are re-applied to both copies at every final-phase step."""

    @torch.no_grad()
    def reapply_masks(self) -> None:
        """Zero the masked lambdas in the fp32 master copies and in the module's parameters."""
        import deepspeed
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_full_fp32_param, safe_set_local_fp32_param

        lambdas = [a.E for a in self.adapters]
        if self.partitioned:  # each process masks its partition of the master copy
            for e, a in zip(lambdas, self.adapters, strict=True):
                local = safe_get_local_fp32_param(e)
                safe_set_local_fp32_param(e, local * partition_of(a.rank_mask, e).to(local.dtype))
        else:
            for e, master, a in zip(lambdas, self.values(lambdas), self.adapters, strict=True):
                safe_set_full_fp32_param(e, master * a.rank_mask.to(master.dtype))
        gathered = deepspeed.zero.GatheredParameters(lambdas, modifier_rank=0) if self.partitioned else nullcontext()
        with gathered:  # ZeRO-3: the module's lambdas whole; rank 0's are re-partitioned on exit
            for e, a in zip(lambdas, self.adapters, strict=True):
                e.data.mul_(a.rank_mask.to(e.dtype))
