"""LoRA (B = 0 at init, fixed rank) and structured pruning of LoRA doublets with AdaLoRA's scores and schedule."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from conftest import tiny_bert, token_batch

from adalora import AdaLoRAConfig, RankAllocator, find_adapters
from adalora.baselines import as_lora, inject_lora, lora_config, pruned_lora_config
from adalora.inject import trainable_parameter_count
from adalora.integrations.loop import fit

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lora_starts_as_the_base_model_and_computes_x_w_plus_scale_b_a_x() -> None:
    base = tiny_bert()
    batch = token_batch()
    expected = base(batch).logits
    model = inject_lora(copy.deepcopy(base), lora_config(4, target_modules=("query", "value"), alpha=8.0))
    torch.testing.assert_close(model(batch).logits, expected)
    name, layer = find_adapters(model)[0]
    assert layer.scale == 8.0 / 4  # LoRA's alpha / r
    assert not layer.E.requires_grad and torch.equal(layer.E, torch.ones(4))
    assert torch.count_nonzero(layer.P) == 0  # B = 0
    bound = 1 / math.sqrt(layer.d_in)  # Kaiming-uniform(a=sqrt(5)) bound of A
    assert layer.Q.abs().max() <= bound and layer.Q.std() > bound / 4
    with torch.no_grad():
        layer.P.normal_()
    x = torch.randn(3, layer.d_in)
    manual = x @ layer.weight.T + layer.bias + layer.scale * (x @ layer.Q.T) @ layer.P.T
    torch.testing.assert_close(layer(x), manual)


def test_lora_trains_b_and_a_but_not_the_gate() -> None:
    model = inject_lora(tiny_bert(), lora_config(4, target_modules=("query", "value")))
    adapters = find_adapters(model)
    # 4 adapters x r x (d_out + d_in), no lambda
    assert trainable_parameter_count(model) == len(adapters) * 4 * (32 + 32)
    assert as_lora(model) is model


def test_as_lora_needs_adapters() -> None:
    with pytest.raises(ValueError, match="inject"):
        as_lora(tiny_bert())


def test_pruned_lora_keeps_exactly_the_budget_and_zeroes_pruned_gates() -> None:
    config = pruned_lora_config(
        AdaLoRAConfig(
            target_modules=("query", "value"),
            init_r=4,
            target_r=2,
            warmup_steps=1,
            final_steps=2,
            mask_interval=1,
            total_steps=8,
            modules_to_save=("classifier",),
        )
    )
    assert config.orth_reg_weight == 0
    model = inject_lora(tiny_bert(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    allocator = RankAllocator(model, config, optimizer=optimizer, on_misuse="error")
    generator = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(0, 100, (4, 8), generator=generator), "labels": torch.randint(0, 2, (4,))}
        for _ in range(4)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # frozen gates must not trigger the "no gradient" warning
        fit(model, batches, optimizer, allocator, epochs=2)
    assert sum(allocator.rank_pattern().values()) == allocator.target_budget == 8
    for _, layer in find_adapters(model):
        # A kept doublet has gate 1, a pruned one gate 0: pruning removes {B[:, i], A[i, :]} from the update.
        assert torch.equal(layer.E, layer.rank_mask.float())


def test_pruned_lora_refuses_the_magnitude_score() -> None:
    with pytest.raises(ValueError, match="magnitude"):
        pruned_lora_config(AdaLoRAConfig(importance="magnitude"))
