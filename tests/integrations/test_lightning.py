"""PyTorch Lightning: AdaLoRALightningCallback reads T from the trainer, steps the allocator once per optimizer step
under gradient accumulation, adds the regulariser's gradient (before clipping: equal to gamma * R in the loss), and
resumes exactly from a Lightning checkpoint."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import small_config, tiny_bert
from torch import nn

from adalora import AdaLoRAConfig, inject

pl = pytest.importorskip("pytorch_lightning")

from adalora.integrations.lightning import AdaLoRALightningCallback  # noqa: E402

CONFIG = small_config()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class Classifier(pl.LightningModule):
    def __init__(self, config: AdaLoRAConfig, regularizer_in_loss: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        model = tiny_bert()
        for module in model.modules():  # deterministic forward passes
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        self.model = inject(model, config).train()
        self.regularizer_in_loss = regularizer_in_loss
        self.loss_form_allocator = None

    def training_step(self, batch, batch_idx):
        input_ids, labels = batch
        loss = self.model(input_ids=input_ids, labels=labels).loss
        if self.regularizer_in_loss:  # the reference: Lightning divides the whole loss by the accumulation
            loss = loss + self.loss_form_allocator.regularization()
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def loader():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (16, 8), generator=generator)
    labels = torch.arange(16) % 2
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, labels), batch_size=2, shuffle=False)


def trainer_for(tmp_path: Path, callbacks, **overrides) -> pl.Trainer:
    values = {
        "max_epochs": 2,
        "accumulate_grad_batches": 2,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": str(tmp_path),
        "deterministic": True,
    }
    return pl.Trainer(callbacks=callbacks, **{**values, **overrides})


def adapter_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if k.endswith((".P", ".E", ".Q", ".rank_mask"))}


def test_allocation_and_regulariser_once_per_optimizer_step(tmp_path: Path) -> None:
    states = {}
    for gamma in (0.1, 0.0):
        config = CONFIG.replace(orth_reg_weight=gamma)
        callback = AdaLoRALightningCallback(config, on_misuse="error")
        module = Classifier(config)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            trainer_for(tmp_path, [callback]).fit(module, loader())
        # 16 examples / 2 = 8 micro-batches = 4 optimizer steps per epoch, 2 epochs: T from the trainer.
        assert callback.allocator.config.total_steps == callback.allocator.step_count == 8
        assert callback.allocator.pairing.optimizer_steps == 8
        assert sum(callback.allocator.rank_pattern().values()) == callback.allocator.target_budget
        states[gamma] = adapter_state(module)
    key = "model.bert.encoder.layer.0.attention.self.query.P"
    assert not torch.allclose(states[0.1][key], states[0.0][key])


@pytest.mark.parametrize("timing", ["after_step", "before_step"])
def test_gradient_form_equals_the_loss_form_with_clipping(tmp_path: Path, timing: str) -> None:
    config = CONFIG.replace(orth_reg_weight=0.5, importance_timing=timing)
    gradient = Classifier(config)
    callback = AdaLoRALightningCallback(config, on_misuse="error")
    trainer_for(tmp_path, [callback], gradient_clip_val=0.05).fit(gradient, loader())

    class LossForm(AdaLoRALightningCallback):
        """The same allocator, but the regulariser goes into the module's loss and no gradient is added."""

        def on_train_start(self, trainer, pl_module):
            super().on_train_start(trainer, pl_module)
            pl_module.loss_form_allocator = self.allocator

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if self.allocator.config.importance_timing == "before_step":
                self.allocator.measure_importance()

    loss = Classifier(config, regularizer_in_loss=True)
    reference = LossForm(config, on_misuse="error")
    trainer_for(tmp_path, [reference], gradient_clip_val=0.05).fit(loss, loader())
    assert callback.allocator.history == reference.allocator.history
    expected = adapter_state(loss)
    for key, value in adapter_state(gradient).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-6)


def test_resume_from_a_checkpoint_is_exact(tmp_path: Path) -> None:
    uninterrupted = Classifier(CONFIG)
    done = AdaLoRALightningCallback(CONFIG)
    trainer_for(tmp_path / "a", [done], max_epochs=4).fit(uninterrupted, loader())

    class Crash(Exception):
        pass

    class CrashAtEpoch(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:  # mid budgeting phase: 8 of 16 steps done, checkpoint after epoch 2
                raise Crash

    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "b", every_n_epochs=1, save_top_k=-1)
    first = Classifier(CONFIG)
    callbacks = [AdaLoRALightningCallback(CONFIG), checkpoints, CrashAtEpoch()]
    trainer = trainer_for(tmp_path / "b", callbacks, max_epochs=4, enable_checkpointing=True)
    with pytest.raises(Crash):
        trainer.fit(first, loader())
    saved = sorted((tmp_path / "b").glob("epoch=1*.ckpt"))
    assert len(saved) == 1

    resumed = Classifier(CONFIG)
    callback = AdaLoRALightningCallback(CONFIG)
    trainer_for(tmp_path / "b", [callback], max_epochs=4).fit(resumed, loader(), ckpt_path=saved[0])
    assert callback.allocator.step_count == done.allocator.step_count == 16
    assert callback.allocator.history == done.allocator.history
    expected = adapter_state(uninterrupted)
    for key, value in adapter_state(resumed).items():
        torch.testing.assert_close(value, expected[key])


def test_a_checkpoint_without_allocator_state_is_refused(tmp_path: Path) -> None:
    module = Classifier(CONFIG)
    trainer = trainer_for(tmp_path, [], max_epochs=1)
    trainer.fit(module, loader())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(KeyError, match="adalora_allocator"):
        trainer_for(tmp_path, [AdaLoRALightningCallback(CONFIG)], max_epochs=2).fit(
            Classifier(CONFIG), loader(), ckpt_path=tmp_path / "plain.ckpt"
        )
