"""DeepSpeed is refused at construction, never left to score every triplet as unimportant. DeepSpeed is not
installed here: stand-ins carry what the detection reads (a class from the ``deepspeed`` package, ZeRO-3's
``ds_id``/``ds_numel`` parameter attributes, ``TrainingArguments.deepspeed``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_bert

from adalora import AdaLoRAConfig, RankAllocator, inject
from adalora.integrations.trainer import AdaLoRACallback

CONFIG = AdaLoRAConfig(
    target_modules=("query", "value"), init_r=4, target_r=2, warmup_steps=1, final_steps=2, total_steps=8
)


class DeepSpeedEngine(torch.nn.Module):
    """Stands in for deepspeed.runtime.engine.DeepSpeedEngine (wraps the model as .module)."""

    __module__ = "deepspeed.runtime.engine"

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


class DeepSpeedZeroOptimizer:
    """Stands in for ZeRO stage 1/2's optimizer (keeps the gradients in its own partitions)."""

    __module__ = "deepspeed.runtime.zero.stage_1_and_2"
    _optimizer_step_post_hooks: dict = {}  # noqa: RUF012


def test_an_engine_wrapped_model_is_refused() -> None:
    model = inject(tiny_bert(), CONFIG)
    with pytest.raises(ValueError, match="the model is a DeepSpeedEngine.*does not support DeepSpeed"):
        RankAllocator(DeepSpeedEngine(model), CONFIG)


def test_a_deepspeed_optimizer_is_refused() -> None:
    model = inject(tiny_bert(), CONFIG)
    with pytest.raises(ValueError, match="DeepSpeed's DeepSpeedZeroOptimizer.*Supported: one process, DDP"):
        RankAllocator(model, CONFIG, DeepSpeedZeroOptimizer())


def test_zero3_partitioned_adapter_parameters_are_refused() -> None:
    model = inject(tiny_bert(), CONFIG)
    adapter = model.get_submodule("bert.encoder.layer.0.attention.self.query")
    adapter.P.ds_id = 0  # what deepspeed.zero.Init puts on every partitioned parameter
    with pytest.raises(ValueError, match="partitioned by ZeRO-3"):
        RankAllocator(model, CONFIG)


def test_trainer_arguments_with_deepspeed_are_refused_when_the_trainer_is_built() -> None:
    callback = AdaLoRACallback(CONFIG)
    args = SimpleNamespace(deepspeed="ds_config.json")  # TrainingArguments(deepspeed=...) needs deepspeed itself
    with pytest.raises(ValueError, match="TrainingArguments\\(deepspeed=...\\) is set"):
        callback.on_init_end(args, None, None, model=torch.nn.Linear(2, 2))
