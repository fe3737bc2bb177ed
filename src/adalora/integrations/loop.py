"""A plain PyTorch training loop with AdaLoRA wired in correctly, for users without the HF Trainer.

The loop owns the three things that are easy to get wrong by hand:

- the orthogonality regulariser enters every optimizer step exactly once (eq. 4): by default its gradient is
  added to the accumulated gradients before clipping (:meth:`~adalora.RankAllocator.add_regularization_gradient`,
  the mechanism the Trainer and Lightning callbacks use), or with ``regularizer="loss"`` gamma * R is added to
  every micro-batch's loss and divided like it (the same update up to rounding);
- the allocator steps once per *optimizer* step, after ``optimizer.step()`` and before ``zero_grad()``,
  however many micro-batches are accumulated;
- ``start_step`` continues mid-epoch after a restart, skipping the micro-batches already consumed.

Typical use::

    model = adalora.inject(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    steps = count_optimizer_steps(len(loader), epochs=3, accumulation_steps=2)
    allocator = RankAllocator(model, config.replace(total_steps=steps), optimizer=optimizer)
    fit(model, loader, optimizer, allocator, epochs=3, accumulation_steps=2)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..allocator import AllocatorReport, RankAllocator
from ..parallel import deepspeed_in_use

Batch = Any  # whatever the loader yields; by default a mapping of model keyword arguments including labels
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass(frozen=True)
class FitStepReport:
    """What one optimizer step of :func:`fit` did.

    Attributes:
        step: optimizer steps completed, this one included (1-based; the allocator's t is ``step - 1``).
        epoch: 0-based epoch of this step.
        loss: task loss averaged over the step's micro-batches (without the regulariser).
        regularization: gamma * R(P, Q) of the step (0.0 without an allocator): before the update, at the values
            the gradient (or loss) was computed at.
        learning_rate: learning rate of the first parameter group for this step.
        report: the allocator's :class:`~adalora.allocator.AllocatorReport`, or None without an allocator.
    """

    step: int
    epoch: int
    loss: float
    regularization: float
    learning_rate: float
    report: AllocatorReport | None


def steps_per_epoch(num_batches: int, accumulation_steps: int = 1) -> int:
    """Optimizer steps in one pass over ``num_batches`` micro-batches (a short last group still steps)."""
    return math.ceil(num_batches / accumulation_steps)


def count_optimizer_steps(num_batches: int, epochs: int, accumulation_steps: int = 1) -> int:
    """T for the budget schedule: optimizer steps, not micro-batches (``config.replace(total_steps=T)``)."""
    return epochs * steps_per_epoch(num_batches, accumulation_steps)


def model_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Default loss: ``model(**batch).loss`` (Hugging Face models given ``labels``)."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"fit: batches are {type(batch).__name__}, not mappings of model inputs; pass "
            "loss_fn=lambda model, batch: ... that returns the loss of one batch."
        )
    outputs = model(**batch)
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError(
            "fit: the model returned no loss; put 'labels' in the batch or pass loss_fn=lambda model, batch: ..."
        )
    return loss


def fit(
    model: nn.Module,
    batches: Iterable[Batch] | Callable[[int], Iterable[Batch]],
    optimizer: torch.optim.Optimizer,
    allocator: RankAllocator | None = None,
    *,
    epochs: int = 1,
    accumulation_steps: int = 1,
    scheduler: Any | None = None,
    max_grad_norm: float | None = None,
    loss_fn: LossFn = model_loss,
    start_step: int = 0,
    on_step: Callable[[FitStepReport], None] | None = None,
    on_epoch_end: Callable[[int, int], None] | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
    regularizer: Literal["gradient", "loss"] = "gradient",
) -> int:
    """Train ``model`` for ``epochs`` epochs with AdaLoRA's regulariser and allocator.

    Per micro-batch: ``loss_fn(model, batch) / group size`` is backpropagated. Per optimizer step: gamma * dR/dP,
    dR/dQ added to the gradients, gradient clipping, ``optimizer.step()``, ``allocator.step()``,
    ``scheduler.step()``, ``optimizer.zero_grad()``, then ``on_step``.

    Args:
        model: the model (put into train mode at the start of every epoch); a ``DistributedDataParallel``-wrapped
            model synchronises gradients once per optimizer step, not per micro-batch.
        batches: a sized re-iterable of micro-batches (e.g. a ``DataLoader``), or ``epoch -> micro-batches``
            for full control of the order; resuming exactly needs the same order for the same epoch.
        optimizer: optimizer over the trainable parameters.
        allocator: the :class:`~adalora.RankAllocator` built for ``optimizer``, or None (plain training).
        epochs: passes over the data.
        accumulation_steps: micro-batches per optimizer step.
        scheduler: an LR scheduler stepped once per optimizer step, or None.
        max_grad_norm: clip the gradient norm of the trainable parameters to this value, or None.
        loss_fn: ``(model, batch) -> scalar loss``; default :func:`model_loss`.
        start_step: optimizer steps already done (to continue after restoring a checkpoint).
        on_step: called after every optimizer step with a :class:`FitStepReport`.
        on_epoch_end: called as ``on_epoch_end(epoch, step)`` after the last step of each epoch.
        grad_scaler: for float16 autocast: scales the loss before ``backward``, unscales the gradients before
            clipping and the allocator read them, and skips the optimizer step when they overflowed.
        regularizer: ``"gradient"`` (default): add the regulariser's closed-form gradient once per optimizer step,
            before clipping, without an autograd graph; ``"loss"``: add ``allocator.regularization() / group
            size`` to every micro-batch's loss. Both give the same update up to rounding (tested); the loss form
            is for a ``loss_fn`` compiled together with the regulariser into one graph.

    Returns:
        The number of optimizer steps done in all (``start_step`` included).
    """
    _check_arguments(model, optimizer, epochs, accumulation_steps, start_step, regularizer)
    in_loss = allocator is not None and regularizer == "loss"
    loop = _Loop(
        model, optimizer, allocator, loss_fn, accumulation_steps, max_grad_norm, scheduler, grad_scaler, in_loss
    )
    return loop.run(batches, epochs, start_step, on_step, on_epoch_end)


def _check_arguments(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    accumulation_steps: int,
    start_step: int,
    regularizer: str,
) -> None:
    """Refuse, in one line, what :func:`fit` cannot run as asked."""
    if accumulation_steps < 1 or epochs < 0 or start_step < 0:
        raise ValueError("fit: accumulation_steps must be >= 1, epochs and start_step >= 0")
    if regularizer not in ("gradient", "loss"):
        raise ValueError(f"fit: regularizer must be 'gradient' or 'loss', got {regularizer!r}")
    if deepspeed_in_use(model, optimizer, []) is not None:
        raise ValueError(
            "fit: DeepSpeed trains with engine.backward(loss) and engine.step(), which fit does not call; write the "
            "loop with them (docs/scaling-out.md, DeepSpeed) or use the Trainer with AdaLoRACallback."
        )


@dataclass
class _Loop:
    """What :func:`fit` does per epoch, per micro-batch and per optimizer step, with its settings (see there)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    allocator: RankAllocator | None
    loss_fn: LossFn
    accumulation_steps: int
    max_grad_norm: float | None
    scheduler: Any | None
    grad_scaler: torch.amp.GradScaler | None
    in_loss: bool  # the regulariser goes into every micro-batch's loss instead of the gradients

    def run(
        self,
        batches: Iterable[Batch] | Callable[[int], Iterable[Batch]],
        epochs: int,
        start_step: int,
        on_step: Callable[[FitStepReport], None] | None,
        on_epoch_end: Callable[[int, int], None] | None,
    ) -> int:
        """:func:`fit`'s epochs, from optimizer step ``start_step``: the number of optimizer steps done in all."""
        epoch_batches = batches if callable(batches) else (lambda epoch: batches)
        step = start_step
        for epoch in range(epochs):
            done = self.epoch(epoch, epoch_batches(epoch), step, on_step)
            if done is None:  # this epoch was finished before the restart
                continue
            step = done
            if on_epoch_end is not None:
                on_epoch_end(epoch, step)
        return step

    def epoch(
        self, epoch: int, micro_batches: Any, step: int, on_step: Callable[[FitStepReport], None] | None
    ) -> int | None:
        """Train epoch ``epoch`` on from optimizer step ``step``: the step count after it, or None if the epoch was
        done before (``step`` counts all its steps)."""
        num_batches = len(micro_batches)
        per_epoch = steps_per_epoch(num_batches, self.accumulation_steps)
        done_in_epoch = step - epoch * per_epoch
        if done_in_epoch >= per_epoch:
            return None
        self.model.train()
        skip = done_in_epoch * self.accumulation_steps
        losses: list[torch.Tensor] = []
        for index, batch in enumerate(itertools.islice(iter(micro_batches), skip, None), start=skip):
            group_start = index - index % self.accumulation_steps
            group_size = min(self.accumulation_steps, num_batches - group_start)
            last = index + 1 - group_start >= group_size
            loss, reg = self.backward(batch, group_size, last)
            losses.append(loss)
            if not last:
                continue
            reg, learning_rate, report = self.optimizer_step(reg, loss.device)
            step += 1
            if on_step is not None:
                mean_loss = float(torch.stack(losses).mean())
                on_step(FitStepReport(step, epoch, mean_loss, float(reg.detach()), learning_rate, report))
            losses.clear()
        return step

    def backward(self, batch: Batch, group_size: int, last: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Backpropagate one micro-batch of a group of ``group_size``: (its task loss, gamma * R if in the loss)."""
        # Under DDP only the last micro-batch of a step all-reduces: DDP then averages the accumulated
        # gradients once, before the optimizer and the allocator read them.
        sync = self.model.no_sync() if not last and isinstance(self.model, DistributedDataParallel) else nullcontext()
        reg = None
        with sync:
            loss = self.loss_fn(self.model, batch)
            if self.in_loss:
                # Added to every micro-batch and divided like the task loss, so that one optimizer step
                # carries exactly gamma * R whatever the accumulation.
                reg = self.allocator.regularization()  # type: ignore[union-attr]
                total = (loss + reg) / group_size
            else:
                total = loss / group_size
            (self.grad_scaler.scale(total) if self.grad_scaler is not None else total).backward()
        return loss.detach(), reg

    def optimizer_step(
        self, reg: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor, float, AllocatorReport | None]:
        """Regulariser gradient, clipping, the optimizer, allocator and scheduler steps, ``zero_grad``: (gamma * R,
        the step's learning rate, the allocator's report). ``reg``: gamma * R of the last micro-batch's loss."""
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)  # the true gradients, for clipping and the importance scores
        if self.allocator is None:
            reg = torch.zeros((), device=device)
        elif not self.in_loss:
            # Once per optimizer step, on the gradients DDP has already averaged (the regulariser's gradient
            # is the same on every process), and before clipping so that clipping sees the whole objective.
            reg = self.allocator.add_regularization_gradient()
        if self.max_grad_norm is not None:
            trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(trainable, self.max_grad_norm)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)  # skipped if a gradient overflowed
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        report = self.allocator.step() if self.allocator is not None else None
        learning_rate = float(self.optimizer.param_groups[0]["lr"])
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        assert reg is not None
        return reg, learning_rate, report
