"""How training can use the allocator wrongly, and what it reports: the optimizer pairing and missing gradients.

The budget schedule counts optimizer steps, so an allocator stepped per micro-batch, or not at all, prunes at the
wrong time without any error. :class:`OptimizerPairing` watches the optimizer through its step hooks and tells the
allocator's steps that do not pair with one: twice without an optimizer step in between (one call per micro-batch
under gradient accumulation; unless a ``GradScaler`` skipped the optimizer step after an overflow, which is
legitimate), or the optimizer two steps ahead (the allocator forgotten). :class:`Misuse` reports each kind once, as
a warning or, with ``on_misuse="error"``, as an exception.

Frameworks wrap the optimizer (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``);
:func:`unwrap_optimizer` finds the torch optimizer that the hooks are registered on.

An adapter whose module never feeds the loss scores zero importance and is pruned first; the allocator warns once,
and :func:`no_gradient_warning` names the likeliest cause, read from the module names (frameworks that bypass a
module), so that the warning says what to change.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from .layers import SVDAdapter

OnMisuse = Literal["warn", "error"]


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside wrappers that expose it as ``.optimizer`` or ``._optimizer`` (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``), however deeply nested; None stays None.

    The pairing registers step hooks on the optimizer. accelerate's wrapper subclasses ``torch.optim.Optimizer``
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


class Misuse:
    """Reports each kind of misuse once: a ``RuntimeWarning``, or a ``RuntimeError`` with ``on_misuse="error"``.

    Args:
        on_misuse: ``"warn"`` or ``"error"``.
    """

    def __init__(self, on_misuse: OnMisuse) -> None:
        if on_misuse not in ("warn", "error"):
            raise ValueError(f"RankAllocator: on_misuse must be 'warn' or 'error', got {on_misuse!r}")
        self.on_misuse = on_misuse
        self._warned: set[str] = set()

    def report(self, key: str, message: str) -> None:
        """A misuse of kind ``key``: raise, or warn the first time."""
        if self.on_misuse == "error":
            raise RuntimeError(message)
        self.warn_once(key, message)

    def warn_once(self, key: str, message: str) -> None:
        """Warn about ``key`` the first time only, whatever ``on_misuse`` (for what is no misuse, e.g. a skip)."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)


class OptimizerPairing:
    """Counts the optimizer's steps through its step hooks and checks them against the allocator's.

    Args:
        optimizer: the torch optimizer (see :func:`unwrap_optimizer`), or None: nothing to pair with.
        allocator_steps: how many times the allocator has stepped so far.
        adapters: the allocator's adapters (their gradients tell an overflow step from a micro-batch).
        misuse: where problems are reported.
        before_step: called by a pre-step hook just before the optimizer updates the weights, or None.

    Attributes:
        optimizer_steps: optimizer steps taken (restored with the allocator's state).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None,
        allocator_steps: Callable[[], int],
        adapters: Sequence[SVDAdapter],
        misuse: Misuse,
        before_step: Callable[[], None] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.allocator_steps = allocator_steps
        self.adapters = adapters
        self.misuse = misuse
        self.optimizer_steps = 0
        self._steps_at_last_check = 0
        self._hooks: list[Any] = []
        self._pre_hook: Any = None
        if optimizer is not None:
            self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))
            if before_step is not None:
                self._pre_hook = optimizer.register_step_pre_hook(lambda *_: before_step())
                self._hooks.append(self._pre_hook)

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.optimizer_steps += 1
        allocator_steps = self.allocator_steps()
        if self.optimizer_steps - allocator_steps >= 2:
            self.misuse.report(
                "lagging",
                f"The optimizer has taken {self.optimizer_steps} steps but RankAllocator.step() was called "
                f"{allocator_steps} times: call it after every optimizer step, or the budget schedule "
                "and importance scores fall behind (nothing gets pruned on time).",
            )

    def check(self, step: int) -> None:
        """Called by the allocator's step ``step``: report it if no optimizer step came since the previous one."""
        if not self._hooks:
            return
        if self.optimizer_steps == self._steps_at_last_check and step > 0 and not self._overflowed():
            self.misuse.report(
                "micro_batches",
                "RankAllocator.step() was called twice without an optimizer step in between: call it once "
                "per optimizer step, not per micro-batch (gradient accumulation).",
            )
        self._steps_at_last_check = self.optimizer_steps

    def _overflowed(self) -> bool:
        """Whether some adapter gradient is non-finite: a step that a ``GradScaler`` skipped after an overflow.

        Read from the adapters, not a list kept aside: ``compact()`` replaces the parameters in the final phase.
        """
        grads = [p.grad for a in self.adapters for p in a.adapter_parameters() if p.grad is not None]
        return bool(grads) and not bool(torch.stack(torch._foreach_max(grads)).isfinite().all())

    def restore(self, optimizer_steps: int) -> None:
        """Continue from a checkpoint taken after ``optimizer_steps`` optimizer steps."""
        self.optimizer_steps = self._steps_at_last_check = optimizer_steps

    def remove_pre_hook(self) -> None:
        """Stop calling ``before_step`` from the optimizer, for a caller that calls it at the right time itself
        (Lightning runs the backward pass inside ``optimizer.step``, after torch's pre-step hooks)."""
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._hooks.remove(self._pre_hook)
            self._pre_hook = None

    def remove(self) -> None:
        """Detach from the optimizer."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._pre_hook = None


LM_HEADS = ("lm_head", "embed_out", "output_projection")
"""Last name components of language-model heads (Llama, GPT-NeoX, fairseq)."""


def no_gradient_cause(names: Sequence[str]) -> str:
    """The likeliest reason adapters on modules ``names`` got no gradient."""
    heads = [n for n in names if n.rsplit(".", 1)[-1] in LM_HEADS]
    if heads:
        return (
            f"{heads[0]} is a language-model head: trainers with a fused LM-head loss (TRL's SFTTrainer and "
            "DPOTrainer) compute log-probabilities from its weight directly and never call the module, so its "
            "adapter takes no part in the loss."
        )
    if any("pooler" in n for n in names):
        return "The pooler is unused when the loss reads hidden states only (e.g. BERT's pooler under a custom head)."
    return "They do not feed the loss (modules the forward pass never calls, or whose output is discarded)."


def no_gradient_warning(names: Sequence[str]) -> str:
    """The warning for adapters on modules ``names`` (sorted) that received no gradient."""
    listed = f"{', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
    return (
        f"AdaLoRA adapters received no gradient and count as unimportant (zero sensitivity): {listed}. "
        f"{no_gradient_cause(names)} Drop them from target_modules."
    )
