"""Hugging Face ``transformers.Trainer`` integration.

Two pieces:

- :class:`AdaLoRACallback` is all any ``transformers.Trainer`` subclass needs (the Trainer itself, TRL's
  ``SFTTrainer``/``DPOTrainer``, sentence-transformers' trainer, ``Seq2SeqTrainer``). It builds the
  :class:`~adalora.RankAllocator` when training begins, with ``T`` read from the Trainer (``state.max_steps``:
  epochs, batch size, gradient accumulation and ``max_steps`` already accounted for); adds the regulariser's
  gradient ``gamma * dR/dP, dR/dQ`` once per optimizer step in ``on_pre_optimizer_step`` (after the last
  backward pass and after gradient clipping, just before ``optimizer.step()``), so gamma does not depend on how
  the trainer scales or fuses its loss; steps the allocator once per optimizer step (``on_optimizer_step``:
  after ``optimizer.step()``, before ``zero_grad()``, so the gradients are still there); saves its state into
  every Trainer checkpoint and restores it when training resumes, so ``resume_from_checkpoint`` continues the
  allocation exactly.
- :class:`AdaLoRATrainer`, for those who want ``gamma * R`` in the loss: it adds the regulariser to whatever loss
  ``compute_loss`` produces (the model's own, a ``compute_loss_func``, or a subclass's), scaled so that every
  optimizer step carries it once, and wires the callback in with ``regularizer="loss"``.

The two differ only in where clipping happens: the loss form clips task and regulariser gradients together, the
gradient form clips the task gradient and then adds the regulariser's (transformers fires no event between the
last backward pass and clipping). Without clipping they give the same updates (tested).

Under DeepSpeed (``TrainingArguments(deepspeed=...)``) accelerate steps the engine inside ``backward``, so both
optimizer-step events come after the gradients are gone. The allocator then hooks the engine's optimizer step
itself (see :mod:`adalora.parallel.zero`): it adds the regulariser's gradient and reads the importance gradients
there, in either mode, and DeepSpeed clips the sum (as in the loss form).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.amp.grad_scaler import OptState
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..allocator import AllocatorReport, RankAllocator
from ..config import AdaLoRAConfig
from ..files.atomic import atomic_write
from ..layers import find_adapters
from ..misuse import OnMisuse
from ..parallel import get_rank
from . import sentence_transformers as st

ALLOCATOR_FILE = "adalora_allocator.pt"
RegularizerMode = Literal["gradient", "loss"]


def _unscale_gradients(optimizer: Any) -> None:
    """Unscale fp16 gradients of accelerate's ``AcceleratedOptimizer`` if its ``GradScaler`` has not yet.

    The Trainer unscales them when it clips or measures the gradient norm, which it does before
    ``on_pre_optimizer_step``; this covers a subclass that skips that, so that the regulariser's (unscaled) gradient
    is never added to still-scaled ones. ``GradScaler.step`` then sees them unscaled and does not unscale twice.
    """
    scaler = getattr(optimizer, "scaler", None)
    inner = getattr(optimizer, "optimizer", None)
    if scaler is None or inner is None or not scaler.is_enabled():
        return
    state = scaler._per_optimizer_states[id(inner)]
    if state["stage"] is OptState.READY:
        scaler.unscale_(inner)


class AdaLoRACallback(TrainerCallback):
    """Steps, saves and restores a :class:`~adalora.RankAllocator` inside ``transformers.Trainer``.

    Args:
        config: the configuration the model was injected with. ``total_steps`` may be None: the Trainer's
            ``max_steps`` is used. If it is set and differs, the Trainer's count wins and a misuse is reported.
        on_misuse: ``"warn"`` or ``"error"`` for every misuse the allocator detects (stepped more or less often
            than the optimizer, past ``total_steps``) and for a regulariser missing or counted twice.
        regularizer: ``"gradient"`` (default): the callback adds ``gamma * dR/dP, dR/dQ`` to the gradients in
            ``on_pre_optimizer_step``, once per optimizer step, whatever the trainer does to its loss. ``"loss"``:
            the trainer adds :meth:`regularization` to its loss (what :class:`AdaLoRATrainer` does); the callback
            reports a step without it.

    Attributes:
        allocator: the allocator, built at ``on_train_begin`` (None before).
        last_report: the :class:`~adalora.allocator.AllocatorReport` of the latest step.
        last_regularization: gamma * R at the latest step, a detached 0-dim tensor (gradient form only).
        resume_from: checkpoint directory to restore the allocator from; :class:`AdaLoRATrainer` sets it. When
            None and the Trainer resumes, ``<output_dir>/checkpoint-<global_step>`` is used.
    """

    def __init__(
        self, config: AdaLoRAConfig, *, on_misuse: OnMisuse = "warn", regularizer: RegularizerMode = "gradient"
    ) -> None:
        if regularizer not in ("gradient", "loss"):
            raise ValueError(f"AdaLoRACallback: regularizer must be 'gradient' or 'loss', got {regularizer!r}")
        self.config = config
        self.on_misuse = on_misuse
        self.regularizer = regularizer
        self.allocator: RankAllocator | None = None
        self.last_report: AllocatorReport | None = None
        self.last_regularization: torch.Tensor | None = None
        self.resume_from: str | None = None
        self._regularized = False
        self._pre_step_seen = False
        self._guard: st._Guard | None = None  # set for sentence-transformers models (see protect)

    # ------------------------------------------------------------------ loss
    def regularization(self) -> torch.Tensor:
        """gamma * R(P, Q) to add to the training loss (zero before training begins); ``regularizer="loss"`` only.

        With the default ``regularizer="gradient"`` the callback applies the regulariser itself, and adding this
        to the loss as well would count it twice: that is reported as a misuse.
        """
        if self.allocator is None:
            return torch.zeros(())
        if not self.allocator.layout.gradients_outlive_step:
            # DeepSpeed: the allocator adds the regulariser's gradient inside the engine's step (the Trainer has no
            # event there); in the loss as well it would count twice.
            self._regularized = True
            return torch.zeros(())
        if self.regularizer == "gradient":
            self._misuse(
                "AdaLoRACallback(regularizer='gradient') already adds the regulariser's gradient before every "
                "optimizer step; adding callback.regularization() to the loss as well counts it twice. Either "
                "drop it from the loss, or build the callback with regularizer='loss'."
            )
        self._regularized = True
        return self.allocator.regularization()

    # ------------------------------------------------------------------ events
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        # Before train(resume_from_checkpoint=...) loads a checkpoint, which for a SentenceTransformer drops the
        # adapters' keys: the guard lets that load through and the adapters are restored in on_train_begin.
        if model is not None and st.is_sentence_transformer(model):
            self._guard = st.protect(model)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._guard is not None:
            self._guard.training = False

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
        if st.is_sentence_transformer(model):
            self._guard = st.protect(model)
            self._guard.training = True  # the trainer's checkpoints save the unmerged model (see on_save)
        if self.allocator is not None:  # a second train() call: detach the old allocator from its optimizer
            self.allocator.remove_hooks()
        config = self.config.replace(total_steps=total)
        self.allocator = RankAllocator(model, config, optimizer=optimizer, on_misuse=self.on_misuse)
        self._regularized = False
        if state.global_step > 0:
            self._restore(args, state, model)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, optimizer: Any = None, **kwargs
    ):
        assert self.allocator is not None, "on_pre_optimizer_step before on_train_begin"
        self._pre_step_seen = True
        if self.regularizer == "gradient":
            _unscale_gradients(optimizer)
            # Before optimizer.step(), hence before the allocator's importance_timing="before_step" hook: importance
            # is measured on the gradient of task loss + gamma * R, as with the regulariser in the loss.
            self.last_regularization = self.allocator.add_regularization_gradient()

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        assert self.allocator is not None, "on_optimizer_step before on_train_begin"
        weighted = self.allocator.config.orth_reg_weight > 0
        if self.regularizer == "loss" and not self._regularized and weighted:
            self._misuse(
                "AdaLoRA's orthogonality regulariser is not in the training loss: train with "
                "adalora.integrations.trainer.AdaLoRATrainer, or add callback.regularization() to your loss, or "
                "build the callback with regularizer='gradient' (the default), which applies it itself "
                "(or set orth_reg_weight=0 to train without it)."
            )
        if self.regularizer == "gradient" and not self._pre_step_seen and weighted:
            self._misuse(
                "AdaLoRACallback: this Trainer stepped the optimizer without firing on_pre_optimizer_step, so the "
                "regulariser's gradient was not added. Upgrade transformers (older versions lack the event), or use "
                "AdaLoRATrainer / AdaLoRACallback(regularizer='loss') to put the regulariser in the loss."
            )
        self._pre_step_seen = False
        self.last_report = self.allocator.step()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs: Any):
        if self.allocator is None:
            return
        # Under DDP every process holds the same allocator state: the one that writes the Trainer's files saves
        # it. Under FSDP2 each process holds its own shard of the importance statistics and saves that.
        if not (self.allocator.layout.per_process_state or args.should_save):
            return
        directory = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if directory.is_dir():
            allocator_state = self.allocator.state_dict()
            atomic_write(directory / self._state_file(), lambda file: torch.save(allocator_state, file))
            if self._guard is not None and model is not None and args.should_save:
                st.save_adapters_file(model, directory)

    # ------------------------------------------------------------------ helpers
    def _state_file(self) -> str:
        """``adalora_allocator.pt``, or one file per process when FSDP2 shards the statistics."""
        if self.allocator.layout.per_process_state:
            return ALLOCATOR_FILE.replace(".pt", f"_rank{get_rank()}.pt")
        return ALLOCATOR_FILE

    def _restore(self, args: TrainingArguments, state: TrainerState, model: nn.Module) -> None:
        assert self.allocator is not None
        directory = self.resume_from or os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = Path(directory) / self._state_file()
        if not path.is_file():
            raise FileNotFoundError(
                f"AdaLoRACallback: resuming at step {state.global_step}, but {path} does not exist: the checkpoint was "
                "not written with AdaLoRACallback, so the allocation cannot continue where it stopped."
            )
        self.allocator.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        if self._guard is not None:
            st.restore_adapters_file(model, Path(directory))
            self._guard.adapters_pending = False
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
        regularizer: ``"loss"`` (default): gamma * R is added to the loss; ``"gradient"``: as the callback alone,
            its gradient is added before the optimizer step (see the module docstring for the difference).
        **kwargs: as for ``Trainer``.

    Attributes:
        adalora: the :class:`AdaLoRACallback` (its ``allocator`` gives rank patterns and history).
    """

    def __init__(
        self,
        *args: Any,
        adalora_config: AdaLoRAConfig,
        on_misuse: OnMisuse = "warn",
        regularizer: RegularizerMode = "loss",
        **kwargs: Any,
    ):
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
        self.adalora = AdaLoRACallback(adalora_config, on_misuse=on_misuse, regularizer=regularizer)
        self.add_callback(self.adalora)
        # Added after Trainer.__init__ fired on_init_end: run its construction-time checks and set-up now.
        self.adalora.on_init_end(self.args, self.state, self.control, model=self.model)

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
        if not model.training or self.adalora.regularizer != "loss":
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
