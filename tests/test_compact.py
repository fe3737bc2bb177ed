"""compact(): physically dropping masked triplets, with the optimizer state sliced to match."""

import copy

import pytest
import torch
import torch.nn.functional as F
from adapter_helpers import fake_training, logits
from conftest import tiny_bert, token_batch

from adalora import AdaLoRAConfig, RankAllocator, find_adapters, inject
from adalora.compact import compact, resize_adapters

CONFIG = AdaLoRAConfig(target_modules=["query", "value", "dense"], init_r=6, target_r=2, alpha=8.0)


def _model(config=CONFIG, ranks=(0, 1, 2, 6)):
    model = inject(tiny_bert(), config)
    fake_training(model, list(ranks))
    return model


def test_compact_slices_the_kept_triplets_and_keeps_outputs():
    model = _model()
    x = token_batch()
    before = logits(model, x)
    old = {n: (a.P.clone(), a.E.clone(), a.Q.clone(), a.rank_mask.clone()) for n, a in find_adapters(model)}

    ranks = compact(model)

    assert ranks == {n: int(m.sum()) for n, (_, _, _, m) in old.items()}
    assert sorted(set(ranks.values())) == [0, 1, 2, 6]
    for name, adapter in find_adapters(model):
        p, e, q, mask = old[name]
        assert adapter.r == int(mask.sum())
        assert torch.equal(adapter.P, p[:, mask])
        assert torch.equal(adapter.E, e[mask])
        assert torch.equal(adapter.Q, q[mask])
        assert adapter.rank_mask.all() and adapter.rank_mask.shape == (adapter.r,)
        assert adapter.scale == CONFIG.alpha / CONFIG.init_r  # not alpha / k (reference behaviour)
        assert all(p.requires_grad for p in adapter.adapter_parameters())
    torch.testing.assert_close(logits(model, x), before, atol=1e-6, rtol=1e-5)
    assert compact(model) == ranks  # idempotent


def _train(model, optimizer, masks, x, y, steps):
    """Plain loop; masked lambdas are re-zeroed after each step as RankAllocator does in the final phase."""
    for _ in range(steps):
        loss = F.cross_entropy(model(input_ids=x).logits, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for (_, a), m in zip(find_adapters(model), masks, strict=True):
                if a.r == m.numel():  # uncompacted: zero the masked lambdas
                    a.E.mul_(m)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, foreach=False),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    ],
    ids=["adamw", "adam-amsgrad", "sgd-momentum"],
)
def test_training_after_compact_matches_training_the_masked_model(make_optimizer):
    """Kept triplets follow exactly the same trajectory whether or not the masked ones were cut away, as long as
    the optimizer state is sliced with them (no regulariser: it couples kept and masked columns)."""
    x, y = token_batch(), torch.tensor([0, 1, 1, 0])
    full = _model()
    cut = copy.deepcopy(full)
    masks = [a.rank_mask.clone() for _, a in find_adapters(full)]
    opt_full = make_optimizer([p for p in full.parameters() if p.requires_grad])
    opt_cut = make_optimizer([p for p in cut.parameters() if p.requires_grad])
    _train(full, opt_full, masks, x, y, steps=3)
    _train(cut, opt_cut, masks, x, y, steps=3)

    compact(cut, opt_cut)
    for _, a in find_adapters(cut):
        for p in a.adapter_parameters():
            for value in opt_cut.state[p].values():
                assert value.dim() == 0 or value.shape == p.shape
    _train(full, opt_full, masks, x, y, steps=4)
    _train(cut, opt_cut, masks, x, y, steps=4)

    for (_, a_full), (_, a_cut), m in zip(find_adapters(full), find_adapters(cut), masks, strict=True):
        torch.testing.assert_close(a_cut.P, a_full.P[:, m], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a_cut.E, a_full.E[m], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a_cut.Q, a_full.Q[m], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(cut, x), logits(full, x), atol=1e-5, rtol=1e-4)


def test_fresh_optimizer_state_would_diverge():
    """Control for the test above: rebuilding Adam instead of slicing its state changes the trajectory."""
    x, y = token_batch(), torch.tensor([0, 1, 1, 0])
    full = _model()
    cut = copy.deepcopy(full)
    masks = [a.rank_mask.clone() for _, a in find_adapters(full)]
    opt_full = torch.optim.Adam([p for p in full.parameters() if p.requires_grad], lr=1e-2)
    opt_cut = torch.optim.Adam([p for p in cut.parameters() if p.requires_grad], lr=1e-2)
    _train(full, opt_full, masks, x, y, steps=3)
    _train(cut, opt_cut, masks, x, y, steps=3)
    compact(cut)
    opt_cut = torch.optim.Adam([p for p in cut.parameters() if p.requires_grad], lr=1e-2)
    _train(full, opt_full, masks, x, y, steps=2)
    _train(cut, opt_cut, masks, x, y, steps=2)
    assert not torch.allclose(logits(cut, x), logits(full, x), atol=1e-4)


def test_unsliceable_optimizer_state_is_refused_before_anything_changes():
    model = _model()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    name, adapter = find_adapters(model)[-1]
    optimizer.state[adapter.P]["factored_row"] = torch.zeros(adapter.d_out)  # like Adafactor's row statistics
    shapes = {n: a.P.shape for n, a in find_adapters(model)}
    with pytest.raises(ValueError, match=rf"factored_row.*{name}\.P.*without the optimizer"):
        compact(model, optimizer)
    assert {n: a.P.shape for n, a in find_adapters(model)} == shapes


def test_compact_without_adapters_is_an_error():
    with pytest.raises(ValueError, match="no AdaLoRA adapters"):
        compact(tiny_bert())


def test_resize_adapters_checks_names_and_ranks():
    model = inject(tiny_bert(), CONFIG)
    name = find_adapters(model)[0][0]
    with pytest.raises(ValueError, match="no adapter named"):
        resize_adapters(model, {"nope": 1})
    with pytest.raises(ValueError, match=r"must lie in \[0, 6\]"):
        resize_adapters(model, {name: 7})
    resize_adapters(model, {name: 3})
    assert model.get_submodule(name).r == 3


def _allocator_run(compact_at_final: bool):
    config = AdaLoRAConfig(
        target_modules=["query", "value"],
        init_r=4,
        target_r=2,
        alpha=8.0,
        warmup_steps=2,
        final_steps=4,
        mask_interval=2,
        total_steps=12,
        orth_reg_weight=0.0,  # the regulariser sees masked columns only when they are kept: see the docs
        compact_at_final=compact_at_final,
    )
    torch.manual_seed(0)
    model = inject(tiny_bert(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    allocator = RankAllocator(model, config, optimizer)
    x, y = token_batch(), torch.tensor([0, 1, 1, 0])
    sizes = []
    for _ in range(12):
        loss = F.cross_entropy(model(input_ids=x).logits, y) + allocator.regularization()
        loss.backward()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
        sizes.append(sum(a.r for _, a in find_adapters(model)))
    return model, allocator, sizes


def test_allocator_compacts_at_the_final_allocation():
    plain, plain_alloc, plain_sizes = _allocator_run(False)
    cut, cut_alloc, cut_sizes = _allocator_run(True)
    final_start = 12 - 4
    assert plain_sizes == [4 * 4] * 12
    assert cut_sizes[:final_start] == [16] * final_start
    assert cut_sizes[final_start:] == [cut_alloc.target_budget] * (12 - final_start) == [8] * 4
    assert cut_alloc.rank_pattern() == plain_alloc.rank_pattern()
    torch.testing.assert_close(logits(cut, token_batch()), logits(plain, token_batch()), atol=1e-5, rtol=1e-4)


def test_compact_at_final_needs_the_optimizer():
    config = CONFIG.replace(compact_at_final=True, total_steps=100, warmup_steps=10, final_steps=10)
    model = inject(tiny_bert(), config)
    with pytest.raises(ValueError, match="optimizer=opt"):
        RankAllocator(model, config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_compact_at_final_on_cuda(fused):
    config = CONFIG.replace(total_steps=12, warmup_steps=2, final_steps=4, mask_interval=2, compact_at_final=True)
    model = inject(tiny_bert(), config).cuda()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=fused)
    allocator = RankAllocator(model, config, optimizer)
    x, y = token_batch().cuda(), torch.tensor([0, 1, 1, 0]).cuda()
    for _ in range(12):
        loss = F.cross_entropy(model(input_ids=x).logits, y) + allocator.regularization()
        loss.backward()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
    adapters = [a for _, a in find_adapters(model)]
    assert sum(a.r for a in adapters) == allocator.target_budget
    assert all(a.P.is_cuda and a.rank_mask.is_cuda for a in adapters)
    for a in adapters:
        for p in a.adapter_parameters():
            assert optimizer.state[p]["exp_avg"].shape == p.shape
