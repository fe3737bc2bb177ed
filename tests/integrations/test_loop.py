"""The plain-PyTorch loop: regulariser in the loss, one allocator step per optimizer step, exact continuation,
and the allocator's misuse checks surfacing through it."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import small_config, tiny_bert
from torch import nn

from adalora import RankAllocator, inject
from adalora.integrations.loop import FitStepReport, count_optimizer_steps, fit, steps_per_epoch

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = small_config(final_steps=1)


def micro_batches(n: int, size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(0, 100, (size, 8), generator=generator), "labels": torch.randint(0, 2, (size,))}
        for _ in range(n)
    ]


def build(steps: int | None, *, on_misuse: str = "error", allocator: bool = True, dropout: bool = False, gamma=0.1):
    torch.manual_seed(0)
    model = tiny_bert()
    if not dropout:  # deterministic forward passes: runs with different batching must agree exactly
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    config = CONFIG.replace(total_steps=steps, orth_reg_weight=gamma)
    inject(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    alloc = RankAllocator(model, config, optimizer=optimizer, on_misuse=on_misuse) if allocator else None
    return model, optimizer, alloc


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith((".P", ".E", ".Q", ".rank_mask"))}


def test_step_counting() -> None:
    assert steps_per_epoch(10, 3) == 4  # a short last group still steps
    assert count_optimizer_steps(10, epochs=2, accumulation_steps=3) == 8


def test_allocator_steps_once_per_optimizer_step_with_accumulation() -> None:
    batches = micro_batches(7, 2)
    steps = count_optimizer_steps(len(batches), epochs=2, accumulation_steps=2)  # 4 per epoch
    model, optimizer, allocator = build(steps)
    results: list[FitStepReport] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no misuse warning of any kind
        done = fit(model, batches, optimizer, allocator, epochs=2, accumulation_steps=2, on_step=results.append)
    assert done == steps == allocator.step_count == 8
    assert [r.report.step for r in results] == list(range(8))
    assert [r.epoch for r in results] == [0] * 4 + [1] * 4
    assert sum(allocator.rank_pattern().values()) == allocator.target_budget
    assert all(r.regularization > 0 for r in results)


def test_accumulated_micro_batches_equal_one_large_batch() -> None:
    small = micro_batches(8, 2)
    large = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(small[::2], small[1::2], strict=True)]
    model_a, opt_a, alloc_a = build(4)
    model_b, opt_b, alloc_b = build(4)
    fit(model_a, small, opt_a, alloc_a, accumulation_steps=2)
    fit(model_b, large, opt_b, alloc_b)
    assert alloc_a.rank_pattern() == alloc_b.rank_pattern()
    for key, value in adapter_state(model_a).items():
        torch.testing.assert_close(value, adapter_state(model_b)[key], rtol=1e-4, atol=1e-6)


def test_regularizer_is_added_to_a_custom_loss() -> None:
    batches = [(b["input_ids"], b["labels"]) for b in micro_batches(2, 2)]
    model, optimizer, allocator = build(4)
    seen: list[FitStepReport] = []

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, labels = batch
        return nn.functional.cross_entropy(model(input_ids=inputs).logits, labels)

    fit(model, batches, optimizer, allocator, epochs=2, loss_fn=loss_fn, on_step=seen.append)
    assert all(r.regularization > 0 for r in seen)
    # The P factors received the regulariser's gradient: with gamma = 0 their first update differs.
    updated = []
    for gamma in (0.0, 0.1):
        model, optimizer, allocator = build(4, gamma=gamma)
        fit(model, batches[:1], optimizer, allocator, loss_fn=loss_fn)
        updated.append(adapter_state(model)["bert.encoder.layer.0.attention.self.query.P"])
    assert not torch.allclose(*updated)


@pytest.mark.parametrize("form", ["reference", "paper"])
def test_regulariser_as_gradient_equals_regulariser_in_the_loss(form: str) -> None:
    """fit's default (closed-form gradient once per step, before clipping) against gamma * R in every micro-batch's
    loss: the same run up to rounding, with accumulation, a short last group and clipping."""
    batches = micro_batches(7, 2)
    runs = []
    for regularizer in ("gradient", "loss"):
        model, optimizer, allocator = build(8, gamma=0.5)
        allocator.config = allocator.config.replace(regularizer=form)
        seen: list[FitStepReport] = []
        fit(
            model,
            batches,
            optimizer,
            allocator,
            epochs=2,
            accumulation_steps=2,
            max_grad_norm=0.5,
            regularizer=regularizer,
            on_step=seen.append,
        )
        runs.append((model, allocator, seen))
    (model_g, alloc_g, seen_g), (model_l, alloc_l, seen_l) = runs
    assert alloc_g.history == alloc_l.history
    for a, b in zip(seen_g, seen_l, strict=True):
        assert a.regularization == pytest.approx(b.regularization, rel=1e-5)
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
    expected = adapter_state(model_l)
    for key, value in adapter_state(model_g).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-6)


def test_an_unknown_regulariser_mode_is_refused() -> None:
    model, optimizer, allocator = build(4)
    with pytest.raises(ValueError, match="'gradient' or 'loss'"):
        fit(model, micro_batches(2, 2), optimizer, allocator, regularizer="grad")


def test_start_step_continues_exactly_mid_epoch() -> None:
    batches = micro_batches(6, 2)
    steps = count_optimizer_steps(len(batches), epochs=2, accumulation_steps=2)  # 3 per epoch, 6 in all
    model, optimizer, allocator = build(steps, dropout=True)
    torch.manual_seed(1)
    fit(model, batches, optimizer, allocator, epochs=2, accumulation_steps=2)
    expected = adapter_state(model)

    class Stop(Exception):
        pass

    def stop_at_4(result: FitStepReport) -> None:
        if result.step == 4:
            raise Stop

    model, optimizer, allocator = build(steps, dropout=True)
    torch.manual_seed(1)
    with pytest.raises(Stop):
        fit(model, batches, optimizer, allocator, epochs=2, accumulation_steps=2, on_step=stop_at_4)
    saved = (
        adapter_state(model),
        {k: v.clone() for k, v in model.state_dict().items() if "classifier" in k},
        optimizer.state_dict(),
        allocator.state_dict(),
        torch.get_rng_state(),
    )
    import copy

    saved = copy.deepcopy(saved)
    model, optimizer, allocator = build(steps, dropout=True)
    model.load_state_dict({**saved[0], **saved[1]}, strict=False)
    optimizer.load_state_dict(saved[2])
    allocator.load_state_dict(saved[3])
    torch.set_rng_state(saved[4])
    seen: list[int] = []
    done = fit(
        model,
        batches,
        optimizer,
        allocator,
        epochs=2,
        accumulation_steps=2,
        start_step=4,
        on_step=lambda r: seen.append(r.step),
    )
    assert done == 6 and seen == [5, 6]
    for key, value in expected.items():
        torch.testing.assert_close(adapter_state(model)[key], value)


def test_training_past_total_steps_is_reported() -> None:
    batches = micro_batches(3, 2)
    model, optimizer, allocator = build(count_optimizer_steps(3, epochs=2), on_misuse="warn")
    with pytest.warns(RuntimeWarning, match="past total_steps=6"):
        fit(model, batches, optimizer, allocator, epochs=3)
    model, optimizer, allocator = build(count_optimizer_steps(3, epochs=2), on_misuse="error")
    with pytest.raises(RuntimeError, match="past total_steps"):
        fit(model, batches, optimizer, allocator, epochs=3)


def test_allocator_left_out_of_the_loop_is_reported() -> None:
    """The allocator exists (hooked to the optimizer) but the loop never steps it: nothing would be pruned."""
    model, optimizer, _ = build(6, on_misuse="warn")
    with pytest.warns(RuntimeWarning, match="RankAllocator.step\\(\\) was called 0 times"):
        fit(model, micro_batches(3, 2), optimizer, None, epochs=2)


def test_stepping_the_allocator_per_micro_batch_is_reported() -> None:
    """A hand-written step in ``on_step`` on top of fit's own: two allocator steps per optimizer step."""
    model, optimizer, allocator = build(12, on_misuse="error")
    with pytest.raises(RuntimeError, match="twice without an optimizer step"):
        fit(model, micro_batches(3, 2), optimizer, allocator, epochs=2, on_step=lambda r: allocator.step())


def test_batches_without_labels_get_a_clear_error() -> None:
    model, optimizer, allocator = build(4)
    with pytest.raises(ValueError, match="returned no loss"):
        fit(model, [{"input_ids": torch.zeros(2, 4, dtype=torch.long)}], optimizer, allocator)
    with pytest.raises(TypeError, match="loss_fn"):
        fit(model, [(torch.zeros(2, 4, dtype=torch.long),)], optimizer, allocator)
