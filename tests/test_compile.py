"""torch.compile: an adapted model compiles as one graph, trains exactly as in eager mode, does not recompile when
the allocator masks triplets, and every library function reads through the compile (and DataParallel) wrapper.

The ``aot_eager`` backend runs the traced forward and backward graphs with eager kernels: it tests what can break
(graph breaks, guards, autograd through the captured graph) without paying for code generation, and its results
are bit-identical to eager mode.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import small_config, tiny_bert, token_batch
from safetensors.torch import load_file

import adalora
from adalora.files.checkpoint import trainable_state_dict

CONFIG = small_config(
    target_modules=("query", "value", "intermediate.dense"),
    init_r=6,
    target_r=3,
    warmup_steps=2,
    final_steps=3,
    mask_interval=2,
    total_steps=12,
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def train(config: adalora.AdaLoRAConfig, compiled: bool) -> tuple[list[float], dict[str, int]]:
    """12 optimizer steps (warm-up, allocations, the final phase) from the same seed; losses and rank pattern."""
    torch.manual_seed(3)
    model = adalora.inject(tiny_bert().train(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    allocator = adalora.RankAllocator(model, config, optimizer)
    forward = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
    ids, labels = token_batch(), torch.tensor([0, 1, 1, 0])
    losses = []
    for _ in range(config.total_steps):  # type: ignore[arg-type]
        loss = F.cross_entropy(forward(input_ids=ids).logits, labels) + allocator.regularization()
        loss.backward()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, allocator.rank_pattern()


@pytest.mark.parametrize("compact_at_final", [False, True])
def test_compiled_training_matches_eager(compact_at_final):
    config = CONFIG.replace(compact_at_final=compact_at_final)
    eager_losses, eager_ranks = train(config, compiled=False)
    compiled_losses, compiled_ranks = train(config, compiled=True)
    assert compiled_ranks == eager_ranks
    assert sorted(set(eager_ranks.values())) != [CONFIG.init_r]  # the allocator did prune
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=0, atol=1e-6)


def test_allocations_do_not_recompile():
    # Masks and lambda change in place, so the graph compiled at the first step serves every allocation;
    # only compaction (new factor shapes) would need a new graph.
    with torch._dynamo.config.patch(error_on_recompile=True):
        _, ranks = train(CONFIG, compiled=True)
    assert min(ranks.values()) < CONFIG.init_r


@pytest.mark.parametrize("wrap", [torch.compile, torch.nn.DataParallel], ids=["compile", "DataParallel"])
def test_library_functions_read_through_wrappers(tmp_path, wrap):
    plain = adalora.inject(tiny_bert(), CONFIG)
    wrapped = wrap(copy.deepcopy(plain))
    names = [n for n, _ in adalora.find_adapters(plain)]
    assert [n for n, _ in adalora.find_adapters(wrapped)] == names
    assert set(trainable_state_dict(wrapped)) == set(trainable_state_dict(plain))

    # Files written from the wrapped model are those of the plain one: they load into a plain model.
    adalora.save_adapter(wrapped, tmp_path / "adapter", CONFIG)
    adalora.save_adapter(plain, tmp_path / "plain", CONFIG)
    keys = set(load_file(tmp_path / "adapter" / "adalora_adapter.safetensors"))
    assert keys == set(load_file(tmp_path / "plain" / "adalora_adapter.safetensors"))
    loaded = adalora.load_adapter(tiny_bert(), tmp_path / "adapter")
    assert [n for n, _ in adalora.find_adapters(loaded)] == names
    adalora.export_peft(wrapped, tmp_path / "peft", CONFIG)
    assert all(
        "_orig_mod" not in k and not k.startswith("module.")
        for k in load_file(tmp_path / "peft" / "adapter_model.safetensors")
    )

    # Functions that change a model change the one inside the wrapper and return the wrapper.
    fresh = wrap(tiny_bert())
    assert adalora.inject(fresh, CONFIG) is fresh
    assert [n for n, _ in adalora.find_adapters(fresh)] == names
    assert adalora.merge(fresh) is fresh and not adalora.find_adapters(fresh)
    into = wrap(tiny_bert())
    assert adalora.load_adapter(into, tmp_path / "adapter") is into and adalora.find_adapters(into)
    assert adalora.unload(into) is into and not adalora.find_adapters(into)


def test_fit_and_checkpoints_take_a_compiled_model(tmp_path):
    from adalora.files.checkpoint import load_checkpoint, save_checkpoint

    def build():
        model = adalora.inject(tiny_bert(), CONFIG)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, optimizer, adalora.RankAllocator(model, CONFIG, optimizer)

    model, optimizer, allocator = build()
    compiled = torch.compile(model, backend="aot_eager")
    batches = [{"input_ids": token_batch(seed=i), "labels": torch.tensor([0, 1, 1, 0])} for i in range(4)]
    steps = adalora.fit(compiled, batches, optimizer, allocator, epochs=2)
    assert steps == 8 and allocator.history  # trained through allocations
    save_checkpoint(tmp_path / "ckpt.pt", model=compiled, optimizer=optimizer, allocator=allocator)

    plain, plain_optimizer, plain_allocator = build()  # resumes into an uncompiled model
    load_checkpoint(tmp_path / "ckpt.pt", model=plain, optimizer=plain_optimizer, allocator=plain_allocator)
    assert plain_allocator.rank_pattern() == allocator.rank_pattern()
    for key, value in trainable_state_dict(model).items():
        torch.testing.assert_close(trainable_state_dict(plain)[key], value, rtol=0, atol=0)


def test_the_regulariser_compiles_and_matches_eager():
    model = adalora.inject(tiny_bert(), CONFIG)
    allocator = adalora.RankAllocator(model, CONFIG)
    with torch.no_grad():
        for adapter in allocator.adapters:
            adapter.P.normal_()
            adapter.Q.normal_()
    eager = allocator.regularization()
    (eager_grad,) = torch.autograd.grad(eager, [allocator.adapters[0].P])
    compiled = torch.compile(allocator.regularization, backend="aot_eager", fullgraph=True)()
    (compiled_grad,) = torch.autograd.grad(compiled, [allocator.adapters[0].P])
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.parametrize("layer", ["linear", "gpt2_conv1d", "conv2d", "embedding"])
def test_every_layer_type_compiles_as_one_graph_with_eager_gradients(layer):
    # The adapter path is a custom autograd function (layers.mixing): dynamo must trace it, forward and backward.
    from adapter_helpers import LAYERS

    adapter, x, _ = LAYERS[layer](torch.float32)
    params = [adapter.P, adapter.E, adapter.Q]
    eager = adapter(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), params)
    compiled = torch.compile(adapter, backend="aot_eager", fullgraph=True)(x)
    compiled_grads = torch.autograd.grad(compiled.square().sum(), params)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want)
