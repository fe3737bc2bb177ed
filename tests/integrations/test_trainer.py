"""transformers.Trainer integration: T from the Trainer, one allocator step per optimizer step, the regulariser
in the loss, exact resume from Trainer checkpoints, and loud misuse."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import small_config, tiny_bert
from transformers import Trainer, TrainerCallback, TrainingArguments

from adalora import AdaLoRAConfig, inject
from adalora.integrations.trainer import ALLOCATOR_FILE, AdaLoRACallback, AdaLoRATrainer

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = small_config(warmup_steps=2, final_steps=3)


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
    regularization = float(trainer.adalora.allocator.regularization().detach())
    assert regularization > 0
    trainer.current_gradient_accumulation_steps = 2
    # The Trainer divides a per-micro-batch loss by the accumulation itself ...
    torch.testing.assert_close(float((regularised - plain).detach()), regularization, rtol=1e-5, atol=1e-6)
    # ... but not a loss already normalised over the accumulated batch: then the regulariser is divided here.
    trainer.loss_is_scaled_for_ga = True
    scaled = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=8)
    plain_scaled = Trainer.compute_loss(trainer, trainer.model, dict(batch), num_items_in_batch=8)
    torch.testing.assert_close(float((scaled - plain_scaled).detach()), regularization / 2, rtol=1e-5, atol=1e-6)


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


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def no_dropout_model(config: AdaLoRAConfig = CONFIG):
    model = adapted_model(config)
    for module in model.modules():  # runs with different batching or regulariser forms must agree exactly
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_callback_alone_applies_the_regulariser_on_a_plain_trainer(tmp_path: Path) -> None:
    states = {}
    for gamma in (0.1, 0.0):
        config = CONFIG.replace(orth_reg_weight=gamma)
        callback = AdaLoRACallback(config)
        trainer = Trainer(
            model=no_dropout_model(config), args=arguments(tmp_path), train_dataset=dataset(), callbacks=[callback]
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no "regulariser not in the loss" when it applies it
            trainer.train()
        assert callback.allocator.step_count == 12
        assert (float(callback.last_regularization) > 0) == (gamma > 0)
        states[gamma] = adapter_state(trainer.model)
    key = "bert.encoder.layer.0.attention.self.query.P"
    assert not torch.allclose(states[0.1][key], states[0.0][key])


@pytest.mark.parametrize(("max_grad_norm", "timing"), [(0.0, "after_step"), (0.0, "before_step"), (1e-3, "after_step")])
def test_gradient_form_equals_the_loss_form_but_for_clipping(tmp_path: Path, max_grad_norm: float, timing) -> None:
    """The callback alone (gradient before the optimizer step) against AdaLoRATrainer (gamma * R in the loss, scaled
    for the accumulation): the same updates without clipping; with clipping active they differ (order). With
    importance_timing="before_step" the allocator's pre-step hook measures after the regulariser's gradient was
    added, as it does with R in the loss: the same allocations."""
    args = arguments(tmp_path, max_grad_norm=max_grad_norm, max_steps=6)
    config = CONFIG.replace(orth_reg_weight=0.5, importance_timing=timing)
    callback = AdaLoRACallback(config)
    gradient = Trainer(model=no_dropout_model(config), args=args, train_dataset=dataset(), callbacks=[callback])
    gradient.train()
    loss = AdaLoRATrainer(model=no_dropout_model(config), args=args, train_dataset=dataset(), adalora_config=config)
    loss.train()
    assert callback.allocator.history == loss.adalora.allocator.history
    expected = adapter_state(loss.model)
    close = all(torch.allclose(v, expected[k], rtol=1e-4, atol=1e-6) for k, v in adapter_state(gradient.model).items())
    assert close == (max_grad_norm == 0.0)


def test_regulariser_weight_does_not_depend_on_the_accumulation(tmp_path: Path) -> None:
    """BERT's loss accepts num_items_in_batch, so the Trainer leaves it undivided by the accumulation steps (the
    task gradient then grows with them); the callback's gradient enters once per optimizer step either way. One
    SGD step: the update with gamma minus the update without is -lr * gamma * dR/dP, whatever the accumulation."""
    from adalora.regularizer import add_regularization_gradient

    key = "bert.encoder.layer.0.attention.self.query.P"
    initial = adapter_state(no_dropout_model())[key]
    for batch, accumulation in ((2, 2), (4, 1), (1, 4)):
        updates = {}
        for gamma in (0.5, 0.0):
            config = CONFIG.replace(orth_reg_weight=gamma)
            args = arguments(
                tmp_path,
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
                max_grad_norm=0.0,
                max_steps=6,
                optim="sgd",
                lr_scheduler_type="constant",
            )
            trainer = Trainer(
                model=no_dropout_model(config),
                args=args,
                train_dataset=dataset(),
                callbacks=[AdaLoRACallback(config), StopAt(1)],
            )
            trainer.train()
            updates[gamma] = adapter_state(trainer.model)[key] - initial
        model = no_dropout_model()
        adapters = [m for m in model.modules() if hasattr(m, "rank_mask")]
        add_regularization_gradient(adapters, 0.5, CONFIG.regularizer)
        expected = -1e-2 * model.get_submodule(key.removesuffix(".P")).P.grad
        torch.testing.assert_close(updates[0.5] - updates[0.0], expected, rtol=1e-3, atol=1e-7)


def test_loss_form_callback_on_a_plain_trainer_reports_the_missing_regulariser(tmp_path: Path) -> None:
    callback = AdaLoRACallback(CONFIG, regularizer="loss")
    trainer = Trainer(model=adapted_model(), args=arguments(tmp_path), train_dataset=dataset(), callbacks=[callback])
    with pytest.warns(RuntimeWarning, match="regulariser is not in the training loss"):
        trainer.train()
    assert callback.allocator.step_count == 12  # it still allocates
    strict = AdaLoRACallback(CONFIG, on_misuse="error", regularizer="loss")
    trainer = Trainer(model=adapted_model(), args=arguments(tmp_path), train_dataset=dataset(), callbacks=[strict])
    with pytest.raises(RuntimeError, match="regulariser"):
        trainer.train()


def test_regulariser_in_the_loss_and_as_gradient_is_reported(tmp_path: Path) -> None:
    callback = AdaLoRACallback(CONFIG, on_misuse="error")
    trainer = Trainer(model=adapted_model(), args=arguments(tmp_path), train_dataset=dataset(), callbacks=[callback])
    trainer.state.max_steps = 12
    callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model)
    with pytest.raises(RuntimeError, match="counts it twice"):
        callback.regularization()
    with pytest.raises(ValueError, match="'gradient' or 'loss'"):
        AdaLoRACallback(CONFIG, regularizer="both")


def test_a_trainer_without_the_pre_optimizer_event_is_reported(tmp_path: Path) -> None:
    callback = AdaLoRACallback(CONFIG, on_misuse="error")
    trainer = Trainer(model=adapted_model(), args=arguments(tmp_path), train_dataset=dataset(), callbacks=[callback])
    trainer.state.max_steps = 12
    callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model)
    with pytest.raises(RuntimeError, match="without firing on_pre_optimizer_step"):
        callback.on_optimizer_step(trainer.args, trainer.state, trainer.control)


def test_a_total_steps_that_disagrees_with_the_trainer_is_reported(tmp_path: Path) -> None:
    config = CONFIG.replace(total_steps=100)
    trainer = AdaLoRATrainer(
        model=adapted_model(config), args=arguments(tmp_path), train_dataset=dataset(), adalora_config=config
    )
    with pytest.warns(RuntimeWarning, match="the Trainer will take 12"):
        trainer.train()
    assert trainer.adalora.allocator.config.total_steps == 12


def test_still_scaled_fp16_gradients_are_unscaled_before_the_regulariser_is_added() -> None:
    """A GradScaler whose gradients were not unscaled yet (a subclass that neither clips nor measures the norm):
    the callback unscales them first, so the regulariser's gradient is not added to gradients 4x too large, and
    GradScaler.step does not unscale twice."""
    from types import SimpleNamespace

    from adalora.integrations.trainer import _unscale_gradients

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale((weight * torch.tensor([1.0, 2.0, 3.0])).sum()).backward()
    assert weight.grad.tolist() == [4.0, 8.0, 12.0]
    wrapped = SimpleNamespace(optimizer=optimizer, scaler=scaler)  # what accelerate's AcceleratedOptimizer exposes
    _unscale_gradients(wrapped)
    assert weight.grad.tolist() == [1.0, 2.0, 3.0]
    _unscale_gradients(wrapped)  # already unscaled: left alone (GradScaler would raise on a second unscale_)
    weight.grad += 1.0  # stands for the regulariser's gradient
    scaler.step(optimizer)
    assert weight.detach().tolist() == [-1.0, -2.0, -3.0]  # 1 - (g + 1): unscaled once, not twice
    _unscale_gradients(SimpleNamespace(optimizer=optimizer, scaler=None))  # no scaler: nothing to do
