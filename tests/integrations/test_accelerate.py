"""accelerate: the allocator takes the optimizer Accelerator.prepare returns, a plain Accelerator loop with gradient
accumulation (regulariser gradient and allocator step on sync_gradients), and launches that cannot work as
intended (independent processes, a consistency check with nothing to compare) are reported."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import small_config, tiny_bert

from adalora import RankAllocator, inject
from adalora.misuse import unwrap_optimizer

accelerate = pytest.importorskip("accelerate")

CONFIG = small_config(total_steps=6)


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ADALORA_CHECK_CONSISTENCY"):
        monkeypatch.delenv(key, raising=False)


def batches(n: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(0, 100, (2, 8), generator=generator), "labels": torch.randint(0, 2, (2,))}
        for _ in range(n)
    ]


def test_allocator_unwraps_the_accelerated_optimizer_in_an_accumulating_loop() -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = inject(tiny_bert(), CONFIG)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert type(optimizer).__name__ == "AcceleratedOptimizer"
    allocator = RankAllocator(model, CONFIG, optimizer, on_misuse="error")  # AttributeError before the unwrap
    assert allocator.optimizer is optimizer.optimizer
    regularisation = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for batch in batches(12):  # 12 micro-batches / 2 = 6 optimizer steps = total_steps
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch).loss)
                if accelerator.sync_gradients:
                    regularisation.append(float(allocator.add_regularization_gradient()))
                optimizer.step()
                if accelerator.sync_gradients:
                    allocator.step()
                optimizer.zero_grad()
    assert allocator.step_count == allocator.pairing.optimizer_steps == 6
    assert len(regularisation) == 6 and all(r > 0 for r in regularisation)
    assert sum(allocator.rank_pattern().values()) == allocator.target_budget


def test_stepping_the_allocator_per_micro_batch_is_caught_through_the_wrapper() -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = inject(tiny_bert(), CONFIG)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    allocator = RankAllocator(model, CONFIG, optimizer, on_misuse="error")
    with pytest.raises(RuntimeError, match="once per optimizer step"):
        for batch in batches(4):
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch).loss)
                optimizer.step()
                allocator.step()  # every micro-batch: the inner optimizer's hooks see it
                optimizer.zero_grad()


def test_unwrap_optimizer() -> None:
    inner = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    class Wrapper:
        def __init__(self, optimizer) -> None:
            self._optimizer = optimizer

    assert unwrap_optimizer(inner) is inner
    assert unwrap_optimizer(Wrapper(Wrapper(inner))) is inner
    assert unwrap_optimizer(None) is None
    with pytest.raises(TypeError, match="neither a torch.optim.Optimizer"):
        unwrap_optimizer(object())


def test_independent_processes_under_a_launcher_are_reported(monkeypatch) -> None:
    model = inject(tiny_bert(), CONFIG)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what accelerate launch --multi_gpu sets, with no process group here
    with pytest.warns(RuntimeWarning, match="WORLD_SIZE=2 but no torch.distributed process group"):
        RankAllocator(model, CONFIG)
    with pytest.raises(RuntimeError, match="Accelerator\\(cpu=True\\)"):
        RankAllocator(model, CONFIG, on_misuse="error")


def test_a_consistency_check_in_one_process_is_reported() -> None:
    model = inject(tiny_bert(), CONFIG)
    with pytest.warns(RuntimeWarning, match="single process: there is nothing to compare"):
        RankAllocator(model, CONFIG, check_consistency=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        RankAllocator(model, CONFIG)  # nothing requested, nothing reported
