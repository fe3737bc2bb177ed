"""PyTorch Lightning (``lightning.pytorch`` or ``pytorch_lightning`` 2.x): :class:`AdaLoRALightningCallback`.

``Trainer(callbacks=[AdaLoRALightningCallback(config)])`` is all a LightningModule whose model went through
:func:`adalora.inject` needs:

- T is read from ``trainer.estimated_stepping_batches`` (optimizer steps: epochs, ``max_steps``, gradient
  accumulation and the number of devices accounted for) when training starts;
- ``gamma * dR/dP, dR/dQ`` is added to the gradients in ``on_before_optimizer_step``: after the last backward pass
  of the step, and, unlike the transformers Trainer, *before* Lightning clips the gradients, so the update is the
  one of gamma * R in the loss, clipping included;
- the allocator steps once per optimizer step (in ``on_train_batch_end`` whenever ``trainer.global_step`` moved;
  Lightning zeroes the gradients only when the next step begins, so they are still there);
- its state goes into every Lightning checkpoint (``on_save_checkpoint``) and comes back on
  ``trainer.fit(..., ckpt_path=...)``: the resumed run allocates as the uninterrupted one.

Lightning runs the training closure *inside* ``optimizer.step(closure)``, after torch's step pre-hooks, so the
allocator's ``importance_timing="before_step"`` hook would read the gradients before they exist; this callback
takes that hook off and measures importance in ``on_before_optimizer_step`` instead, just after adding the
regulariser's gradient (the gradient of the whole objective, as in the paper).

Lightning is imported on first use of ``AdaLoRALightningCallback``, never by ``import adalora``. The callback
subclasses ``lightning.pytorch.Callback`` when the ``lightning`` package is installed, else
``pytorch_lightning.Callback``; :func:`callback_class` builds it for the other one when both are installed.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import Any

from torch import nn

from ..allocator import AllocatorReport, RankAllocator
from ..config import AdaLoRAConfig
from ..misuse import OnMisuse

STATE_KEY = "adalora_allocator"


def _lightning_package() -> Any:
    """``lightning.pytorch`` if importable, else ``pytorch_lightning``; a clear error with neither."""
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(
        "adalora.integrations.lightning needs PyTorch Lightning: pip install 'adalora[lightning]' "
        "(or pip install lightning)."
    )


class _AdaLoRALightning:
    """The callback's logic, independent of which Lightning package provides the ``Callback`` base class.

    Args:
        config: the configuration the model was injected with; ``total_steps`` may be None (the trainer's
            estimate is used; a different value set here is reported and the trainer's wins).
        on_misuse: ``"warn"`` or ``"error"``, passed to the allocator.

    Attributes:
        allocator: the :class:`~adalora.RankAllocator`, built when training starts.
        last_report: the latest :class:`~adalora.allocator.AllocatorReport`.
        last_regularization: gamma * R at the latest optimizer step (a detached 0-dim tensor).
    """

    def __init__(self, config: AdaLoRAConfig, *, on_misuse: OnMisuse = "warn") -> None:
        super().__init__()
        self.config = config
        self.on_misuse = on_misuse
        self.allocator: RankAllocator | None = None
        self.last_report: AllocatorReport | None = None
        self.last_regularization = None
        self._pending_state: dict[str, Any] | None = None
        self._last_global_step = 0

    # ------------------------------------------------------------------ lifecycle
    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        total = int(trainer.estimated_stepping_batches)
        if self.config.total_steps is not None and self.config.total_steps != total:
            self._misuse(
                f"AdaLoRAConfig.total_steps={self.config.total_steps} but the Lightning trainer will take {total} "
                "optimizer steps; the schedule uses the trainer's. Leave total_steps=None with Lightning."
            )
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"adalora's Lightning callback supports one optimizer, the one that trains the adapters; "
                f"configure_optimizers returned {len(trainer.optimizers)}."
            )
        if self.allocator is not None:
            self.allocator.remove_hooks()
        optimizer = trainer.optimizers[0]
        config = self.config.replace(total_steps=total)
        self.allocator = RankAllocator(pl_module, config, optimizer=optimizer, on_misuse=self.on_misuse)
        if not self.allocator.layout.gradients_outlive_step:
            raise ValueError(
                "AdaLoRALightningCallback: Lightning's DeepSpeed strategy is not supported; under DeepSpeed, train "
                "with the transformers Trainer, accelerate or a plain deepspeed.initialize loop (docs/scaling-out.md)."
            )
        # Torch's pre-step hooks fire before Lightning's closure runs the backward pass: importance_timing=
        # "before_step" is measured in on_before_optimizer_step instead (see the module docstring).
        self.allocator.pairing.remove_pre_hook()
        if self._pending_state is not None:
            self.allocator.load_state_dict(self._pending_state)
            self._pending_state = None
        self._last_global_step = trainer.global_step

    def on_before_optimizer_step(self, trainer: Any, pl_module: nn.Module, optimizer: Any) -> None:
        assert self.allocator is not None, "on_before_optimizer_step before on_train_start"
        self.last_regularization = self.allocator.add_regularization_gradient()
        if self.allocator.config.importance_timing == "before_step":
            self.allocator.measure_importance()

    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int) -> None:
        assert self.allocator is not None, "on_train_batch_end before on_train_start"
        # global_step counts optimizer steps: it moves on the last micro-batch of each accumulation window.
        while self._last_global_step < trainer.global_step:
            self.last_report = self.allocator.step()
            self._last_global_step += 1

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer: Any, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        if self.allocator is not None:
            checkpoint[STATE_KEY] = self.allocator.state_dict()

    def on_load_checkpoint(self, trainer: Any, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        if STATE_KEY not in checkpoint:
            raise KeyError(
                f"adalora's Lightning callback: the checkpoint has no '{STATE_KEY}' entry (it was not written with "
                "this callback), so the allocation cannot continue where it stopped."
            )
        # The allocator is built when training starts, after Lightning restores the checkpoint.
        self._pending_state = checkpoint[STATE_KEY]

    def _misuse(self, message: str) -> None:
        if self.on_misuse == "error":
            raise RuntimeError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@functools.cache
def callback_class(package: str | None = None) -> type:
    """The callback class on the ``Callback`` of ``package`` (``"lightning.pytorch"`` or ``"pytorch_lightning"``;
    None: the one :func:`_lightning_package` finds)."""
    module = importlib.import_module(package) if package else _lightning_package()
    return type("AdaLoRALightningCallback", (_AdaLoRALightning, module.Callback), {"__module__": __name__})


def __getattr__(name: str) -> Any:
    # The callback class is built on first access, so that importing this module without Lightning fails only there.
    if name == "AdaLoRALightningCallback":
        return callback_class()
    raise AttributeError(name)
