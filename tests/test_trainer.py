"""transformers.Trainer integration: T from the Trainer, one allocator step per optimizer step, the regulariser
in the loss, exact resume from Trainer checkpoints, and loud misuse."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert
from transformers import Trainer, TrainerCallback, TrainingArguments

from adalora import AdaLoRAConfig, inject
from adalora.integrations.trainer import ALLOCATOR_FILE, AdaLoRACallback, AdaLoRATrainer

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = AdaLoRAConfig(
    target_modules=("query", "value"),
    init_r=4,
    target_r=2,
    warmup_steps=2,
    final_steps=3,
    mask_interval=1,
    total_steps=None,
    modules_to_save=("classifier",),
)


def dataset(n: int = 24) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 100, (8,), generator=generator), "labels": i % 2} for i in range(n)]


def arguments(output_dir: Path, **overrides) -> TrainingArguments:
    values = {
        "max_steps": 12,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-2,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "logging_steps": 1000,
        "seed": 0,
    }
    return TrainingArguments(output_dir=str(output_dir), **{**values, **overrides})


def adapted_model(config: AdaLoRAConfig = CONFIG):
    torch.manual_seed(0)
    return inject(tiny_bert(), config)


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith((".P", ".E", ".Q", ".rank_mask"))}


def test_trainer_steps_the_allocator_once_per_optimizer_step(tmp_path: Path) -> None:
    trainer = AdaLoRATrainer(
        model=adapted_model(), args=arguments(tmp_path, logging_steps=4), train_dataset=dataset(), adalora_config=CONFIG
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no misuse with gradient accumulation
        trainer.train()
    allocator = trainer.adalora.allocator
    assert allocator.config.total_steps == trainer.state.max_steps == 12
    assert allocator.step_count == 12
    assert trainer.adalora.last_report.step == 11 and trainer.adalora.last_report.phase == "final"
    assert sum(allocator.rank_pattern().values()) == allocator.target_budget == 8
    logged = [(entry["step"], entry["adalora_budget"]) for entry in trainer.state.log_history if "loss" in entry]
    # The Trainer's logs show b(t) of the step just taken (t = global_step - 1).
    assert logged == [(step, allocator.decision(step - 1).budget) for step in (4, 8, 12)]
    assert logged[0][1] < allocator.init_budget


def test_total_steps_come_from_epochs_and_accumulation(tmp_path: Path) -> None:
    args = arguments(tmp_path, max_steps=-1, num_train_epochs=3, per_device_train_batch_size=3)
    trainer = AdaLoRATrainer(model=adapted_model(), args=args, train_dataset=dataset(24), adalora_config=CONFIG)
    trainer.train()
    # 24 examples / 3 = 8 micro-batches = 4 optimizer steps per epoch, 3 epochs
    assert trainer.adalora.allocator.config.total_steps == trainer.adalora.allocator.step_count == 12


def test_regulariser_is_in_the_loss_and_scaled_for_accumulation(tmp_path: Path) -> None:
    trainer = AdaLoRATrainer(
        model=adapted_model(), args=arguments(tmp_path), train_dataset=dataset(), adalora_config=CONFIG
    )
    trainer.state.max_steps = 12  # what train() would set before on_train_begin
    trainer.adalora.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model)
    batch = {"input_ids": torch.stack([d["input_ids"] for d in dataset(4)]), "labels": torch.tensor([0, 1, 0, 1])}
    trainer.model.train()
    for module in trainer.model.modules():  # same forward pass in every call below
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    plain = Trainer.compute_loss(trainer, trainer.model, dict(batch))
    regularised = trainer.compute_loss(trainer.model, dict(batch))
    penalty = float(trainer.adalora.allocator.regularization().detach())
    assert penalty > 0
    trainer.current_gradient_accumulation_steps = 2
    # The Trainer divides a per-micro-batch loss by the accumulation itself ...
    torch.testing.assert_close(float((regularised - plain).detach()), penalty, rtol=1e-5, atol=1e-6)
    # ... but not a loss already normalised over the accumulated batch: then the regulariser is divided here.
    trainer.loss_is_scaled_for_ga = True
    scaled = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=8)
    plain_scaled = Trainer.compute_loss(trainer, trainer.model, dict(batch), num_items_in_batch=8)
    torch.testing.assert_close(float((scaled - plain_scaled).detach()), penalty / 2, rtol=1e-5, atol=1e-6)


class Crash(Exception):
    pass


class CrashAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Crash


def test_resume_from_checkpoint_continues_the_allocation_exactly(tmp_path: Path) -> None:
    def trainer(output_dir: Path) -> AdaLoRATrainer:
        args = arguments(output_dir, save_strategy="steps", save_steps=4)
        return AdaLoRATrainer(model=adapted_model(), args=args, train_dataset=dataset(), adalora_config=CONFIG)

    uninterrupted = trainer(tmp_path / "a")
    uninterrupted.train()
    crashed = trainer(tmp_path / "b")
    crashed.add_callback(CrashAt(6))  # mid budgeting phase (steps 3..8), after the checkpoint at step 4
    with pytest.raises(Crash):
        crashed.train()
    assert (tmp_path / "b" / "checkpoint-4" / ALLOCATOR_FILE).is_file()
    resumed = trainer(tmp_path / "b")
    resumed.train(resume_from_checkpoint=True)
    assert resumed.adalora.allocator.rank_pattern() == uninterrupted.adalora.allocator.rank_pattern()
    assert resumed.adalora.allocator.history == uninterrupted.adalora.allocator.history
    expected = adapter_state(uninterrupted.model)
    for key, value in adapter_state(resumed.model).items():
        torch.testing.assert_close(value, expected[key])


def test_resuming_from_a_checkpoint_without_allocator_state_fails_loudly(tmp_path: Path) -> None:
    args = arguments(tmp_path, save_strategy="steps", save_steps=4)
    crashed = AdaLoRATrainer(model=adapted_model(), args=args, train_dataset=dataset(), adalora_config=CONFIG)
    crashed.add_callback(CrashAt(5))
    with pytest.raises(Crash):
        crashed.train()
    (tmp_path / "checkpoint-4" / ALLOCATOR_FILE).unlink()
    resumed = AdaLoRATrainer(model=adapted_model(), args=args, train_dataset=dataset(), adalora_config=CONFIG)
    with pytest.raises(FileNotFoundError, match="not written with AdaLoRACallback"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_callback_on_a_plain_trainer_reports_the_missing_regulariser(tmp_path: Path) -> None:
    callback = AdaLoRACallback(CONFIG)
    trainer = Trainer(model=adapted_model(), args=arguments(tmp_path), train_dataset=dataset(), callbacks=[callback])
    with pytest.warns(RuntimeWarning, match="regulariser is not in the training loss"):
        trainer.train()
    assert callback.allocator.step_count == 12  # it still allocates
    strict = AdaLoRACallback(CONFIG, on_misuse="error")
    trainer = Trainer(model=adapted_model(), args=arguments(tmp_path), train_dataset=dataset(), callbacks=[strict])
    with pytest.raises(RuntimeError, match="regulariser"):
        trainer.train()


def test_a_total_steps_that_disagrees_with_the_trainer_is_reported(tmp_path: Path) -> None:
    config = CONFIG.replace(total_steps=100)
    trainer = AdaLoRATrainer(
        model=adapted_model(config), args=arguments(tmp_path), train_dataset=dataset(), adalora_config=config
    )
    with pytest.warns(RuntimeWarning, match="the Trainer will take 12"):
        trainer.train()
    assert trainer.adalora.allocator.config.total_steps == 12
