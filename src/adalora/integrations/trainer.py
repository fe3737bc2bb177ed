"""Hugging Face ``transformers.Trainer`` integration.

Two pieces, because the Trainer splits the work the same way:

- :class:`AdaLoRACallback` builds the :class:`~adalora.RankAllocator` when training begins, with ``T`` read
  from the Trainer (``state.max_steps``: epochs, batch size, gradient accumulation and ``max_steps`` already
  accounted for), steps it once per optimizer step (``on_optimizer_step``: after ``optimizer.step()``,
  before ``zero_grad()``, so the gradients are still there), saves its state into every Trainer checkpoint
  and restores it when training resumes, so ``resume_from_checkpoint`` continues the allocation exactly.
- :class:`AdaLoRATrainer` adds the orthogonality regulariser to whatever loss ``compute_loss`` produces
  (the model's own, a ``compute_loss_func``, or a subclass's), and wires the callback in.

Using the callback with a plain ``Trainer`` works but leaves the regulariser out of the loss; the callback
notices (nobody called :meth:`AdaLoRACallback.regularization`) and warns, or raises with
``on_misuse="error"``. Custom trainers add ``callback.regularization()`` to their loss instead.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..allocator import OnMisuse, RankAllocator, StepReport
from ..config import AdaLoRAConfig
from ..files.atomic import atomic_write
from ..layers import find_adapters
from ..parallel import get_rank

ALLOCATOR_FILE = "adalora_allocator.pt"


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (whose own step hooks never fire)."""
    while optimizer is not None and not type(optimizer).__module__.startswith("torch.optim"):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


class AdaLoRACallback(TrainerCallback):
    """Steps, saves and restores a :class:`~adalora.RankAllocator` inside ``transformers.Trainer``.

    Args:
        config: the configuration the model was injected with. ``total_steps`` may be None: the Trainer's
            ``max_steps`` is used. If it is set and differs, the Trainer's count wins and a misuse is reported.
        on_misuse: ``"warn"`` or ``"error"`` for every misuse the allocator detects (stepped more or less often
            than the optimizer, past ``total_steps``) and for a loss without the regulariser.

    Attributes:
        allocator: the allocator, built at ``on_train_begin`` (None before).
        last_report: the :class:`~adalora.StepReport` of the latest step.
        resume_from: checkpoint directory to restore the allocator from; :class:`AdaLoRATrainer` sets it. When
            None and the Trainer resumes, ``<output_dir>/checkpoint-<global_step>`` is used.
    """

    def __init__(self, config: AdaLoRAConfig, *, on_misuse: OnMisuse = "warn") -> None:
        self.config = config
        self.on_misuse = on_misuse
        self.allocator: RankAllocator | None = None
        self.last_report: StepReport | None = None
        self.resume_from: str | None = None
        self._regularized = False

    # ------------------------------------------------------------------ loss
    def regularization(self) -> torch.Tensor:
        """gamma * R(P, Q) to add to the training loss (zero before training begins)."""
        if self.allocator is None:
            return torch.zeros(())
        self._regularized = True
        return self.allocator.regularization()

    # ------------------------------------------------------------------ events
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("AdaLoRACallback: the Trainer passed no model to on_train_begin")
        total = int(state.max_steps)
        if self.config.total_steps is not None and self.config.total_steps != total:
            self._misuse(
                f"AdaLoRAConfig.total_steps={self.config.total_steps} but the Trainer will take {total} optimizer "
                f"steps; the schedule uses the Trainer's {total}. Leave total_steps=None with the Trainer."
            )
        if self.allocator is not None:  # a second train() call: detach the old allocator from its optimizer
            self.allocator.remove_hooks()
        config = self.config.replace(total_steps=total)
        self.allocator = RankAllocator(model, config, optimizer=_unwrap_optimizer(optimizer), on_misuse=self.on_misuse)
        self._regularized = False
        if state.global_step > 0:
            self._restore(args, state)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        assert self.allocator is not None, "on_optimizer_step before on_train_begin"
        if not self._regularized and self.allocator.config.orth_reg_weight > 0:
            self._misuse(
                "AdaLoRA's orthogonality regulariser is not in the training loss: train with "
                "adalora.integrations.trainer.AdaLoRATrainer, or add callback.regularization() to your loss "
                "(or set orth_reg_weight=0 to train without it)."
            )
        self.last_report = self.allocator.step()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.allocator is None:
            return
        # Under DDP every process holds the same allocator state: the one that writes the Trainer's files saves
        # it. Under FSDP2 each process holds its own shard of the importance statistics and saves that.
        if not (self.allocator.tracker.per_process_state or args.should_save):
            return
        directory = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if directory.is_dir():
            allocator_state = self.allocator.state_dict()
            atomic_write(directory / self._state_file(), lambda file: torch.save(allocator_state, file))

    # ------------------------------------------------------------------ helpers
    def _state_file(self) -> str:
        """``adalora_allocator.pt``, or one file per process when FSDP2 shards the statistics."""
        if self.allocator.tracker.per_process_state:
            return ALLOCATOR_FILE.replace(".pt", f"_rank{get_rank()}.pt")
        return ALLOCATOR_FILE

    def _restore(self, args: TrainingArguments, state: TrainerState) -> None:
        assert self.allocator is not None
        directory = self.resume_from or os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = Path(directory) / self._state_file()
        if not path.is_file():
            raise FileNotFoundError(
                f"AdaLoRACallback: resuming at step {state.global_step}, but {path} does not exist: the checkpoint was "
                "not written with AdaLoRACallback, so the allocation cannot continue where it stopped."
            )
        self.allocator.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.resume_from = None

    def _misuse(self, message: str) -> None:
        if self.on_misuse == "error":
            raise RuntimeError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def _accepted_as_adapted(model: Any) -> Iterator[None]:
    """Let ``Trainer.__init__`` accept a quantized transformers model that carries AdaLoRA adapters.

    transformers refuses to train a model with ``is_quantized`` set ("purely quantized models") unless it is a PEFT
    model or ``_hf_peft_config_loaded`` is set (adapters loaded through its PEFT integration). The flag is set only
    while the Trainer checks, because ``save_pretrained`` reads it too (to save PEFT adapters only).
    """
    if not (getattr(model, "is_quantized", False) and find_adapters(model)) or getattr(
        model, "_hf_peft_config_loaded", False
    ):
        yield
        return
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        model._hf_peft_config_loaded = False


class AdaLoRATrainer(Trainer):
    """``transformers.Trainer`` that trains an AdaLoRA model: regulariser in the loss, allocator stepped,
    saved and restored with checkpoints.

    Args:
        *args: as for ``Trainer``; the model must have been prepared by :func:`adalora.inject`.
        adalora_config: the configuration of the injected model (``total_steps`` may be None).
        on_misuse: see :class:`AdaLoRACallback`.
        **kwargs: as for ``Trainer``.

    Attributes:
        adalora: the :class:`AdaLoRACallback` (its ``allocator`` gives rank patterns and history).
    """

    def __init__(self, *args: Any, adalora_config: AdaLoRAConfig, on_misuse: OnMisuse = "warn", **kwargs: Any):
        with _accepted_as_adapted(kwargs.get("model", args[0] if args else None)):
            super().__init__(*args, **kwargs)
        if self.args.world_size > 1 and getattr(self.args, "average_tokens_across_devices", False):
            # transformers 5.x multiplies the loss by the number of processes when forward accepts **kwargs,
            # expecting a token-count-normalised loss; classification losses are not, so gradients (and the
            # importance scores computed from them) come out world_size times too large.
            warnings.warn(
                "AdaLoRATrainer under several processes with average_tokens_across_devices=True: for losses "
                "that are not normalised by a token count (sequence classification) transformers scales the "
                "gradients by the number of processes. Pass TrainingArguments(average_tokens_across_devices="
                "False) unless your loss is a per-token mean (see docs/scaling-out.md).",
                RuntimeWarning,
                stacklevel=2,
            )
        self.adalora = AdaLoRACallback(adalora_config, on_misuse=on_misuse)
        self.add_callback(self.adalora)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        # Tell the callback where the Trainer resumes from (it only sees the restored global step).
        if resume_from_checkpoint is True:
            self.adalora.resume_from = get_last_checkpoint(self.args.output_dir)
        elif isinstance(resume_from_checkpoint, str | os.PathLike):
            self.adalora.resume_from = str(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # Training logs (console, TensorBoard, W&B ...) also show the current budget b(t).
        report = self.adalora.last_report
        if report is not None and "loss" in logs:
            logs = {**logs, "adalora_budget": report.budget}
        super().log(logs, *args, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        reg = self.adalora.regularization()
        # The Trainer divides a per-micro-batch loss by the accumulation steps, but not a loss already
        # normalised over the whole accumulated batch; scale the regulariser so that every optimizer step
        # carries gamma * R exactly once either way.
        if self._loss_scaled_for_accumulation(num_items_in_batch):
            reg = reg / self.current_gradient_accumulation_steps
        loss = loss + reg.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """Whether ``Trainer.training_step`` will leave the loss undivided (mirrors its own test)."""
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        accepts = bool(getattr(self, "model_accepts_loss_kwargs", False))
        return (accepts and num_items_in_batch is not None) or self.compute_loss_func is not None
