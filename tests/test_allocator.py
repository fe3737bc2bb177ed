import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert, token_batch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from adalora import AdaLoRAConfig, RankAllocator, compact, find_adapters, inject
from adalora.allocator import top_b_mask
from adalora.compact import resize_adapters

LABELS = torch.tensor([0, 1, 1, 0])


def _config(**kw):
    base = {
        "target_modules": ["query", "value", "intermediate.dense"],
        "init_r": 4,
        "target_r": 2,
        "warmup_steps": 3,
        "final_steps": 4,
        "mask_interval": 2,
        "total_steps": 20,
        "modules_to_save": ["classifier"],
    }
    return AdaLoRAConfig(**(base | kw))


def _setup(config, seed=0, lr=1e-2):
    torch.manual_seed(seed)
    model = inject(tiny_bert(), config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    return model, optimizer, RankAllocator(model, config, optimizer)


def _train(model, optimizer, allocator, steps, ids=None):
    ids = token_batch() if ids is None else ids
    reports = []
    for _ in range(steps):
        loss = F.cross_entropy(model(ids).logits, LABELS) + allocator.regularization()
        loss.backward()
        optimizer.step()
        reports.append(allocator.step())
        optimizer.zero_grad()
    return reports


def test_top_b_keeps_exactly_b_with_ties():
    scores = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.5, 3.0])
    keep = top_b_mask(scores, 3)
    assert keep.sum() == 3
    assert keep.tolist() == [False, True, True, True, False, False]  # ties go to the earlier triplets
    assert top_b_mask(scores, 0).sum() == 0 and top_b_mask(scores, 10).all()


def test_allocation_with_all_scores_tied_keeps_exactly_the_budget():
    config = _config(importance="magnitude")
    model, optimizer, allocator = _setup(config)
    for adapter in allocator.adapters:
        with torch.no_grad():
            adapter.E.fill_(0.25)  # every triplet has the same score
    decision = allocator.decision(4)
    allocator.step_count = 4  # jump to the first allocation step
    allocation = allocator._allocate(4, decision.budget)
    assert sum(allocation.ranks) == decision.budget
    assert sum(allocator.rank_pattern().values()) == decision.budget


def test_budget_follows_the_schedule_and_ends_at_the_target():
    config = _config()
    model, optimizer, allocator = _setup(config)
    reports = _train(model, optimizer, allocator, 20)
    n = len(allocator.adapters)
    assert [r.budget for r in reports[:4]] == [4 * n] * 4
    allocations = [r.allocation for r in reports if r.allocation is not None]
    assert [a.step for a in allocations] == [4, 6, 8, 10, 12, 14, 16]
    for allocation in allocations:
        assert sum(allocation.ranks) == allocation.budget
    assert allocations[-1].budget == 2 * n and allocator.final
    assert sum(allocator.rank_pattern().values()) == 2 * n
    assert allocator.history == allocations


def test_final_phase_freezes_the_pattern_frees_statistics_and_keeps_masked_lambdas_at_zero():
    model, optimizer, allocator = _setup(_config())
    _train(model, optimizer, allocator, 17)  # through the forced allocation at T - t_f = 16
    assert allocator.final and allocator.tracker.ibar is None and allocator.tracker.ubar is None
    pattern = allocator.rank_pattern()
    masks = [a.rank_mask.clone() for a in allocator.adapters]
    _train(model, optimizer, allocator, 3)
    assert allocator.rank_pattern() == pattern
    for adapter, mask in zip(allocator.adapters, masks, strict=True):
        assert torch.equal(adapter.rank_mask, mask)
        assert torch.all(adapter.E[~mask] == 0)


def test_final_phase_masks_follow_a_loaded_checkpoint():
    # The final phase multiplies lambda by the frozen masks cast once; loading another run's state must replace them.
    model_a, optimizer_a, allocator_a = _setup(_config(), seed=0)
    _train(model_a, optimizer_a, allocator_a, 18)
    model_b, optimizer_b, allocator_b = _setup(_config(), seed=1)
    _train(model_b, optimizer_b, allocator_b, 18)
    masks_b = [a.rank_mask.clone() for a in allocator_b.adapters]
    assert any(not torch.equal(a.rank_mask, m) for a, m in zip(allocator_a.adapters, masks_b, strict=True))
    model_a.load_state_dict(model_b.state_dict())
    allocator_a.load_state_dict(allocator_b.state_dict())
    _train(model_a, optimizer_a, allocator_a, 2)  # optimizer_a moves every lambda, masked ones included
    for adapter, mask in zip(allocator_a.adapters, masks_b, strict=True):
        assert torch.equal(adapter.rank_mask, mask)
        assert torch.all(adapter.E[~mask] == 0) and torch.all(adapter.E[mask] != 0)


class _CountOps(TorchDispatchMode):
    """Counts the non-view operations dispatched inside it, and the scalar reads (``bool()``, ``.item()``) among them:
    on a GPU each read is a host-device synchronisation."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_final_phase_steps_read_nothing_back_from_the_device():
    # The frozen masks are prepared when the pattern freezes or a final-phase state is loaded, not in a later step.
    def final_step(model, optimizer, allocator):
        F.cross_entropy(model(token_batch()).logits, LABELS).backward()
        optimizer.step()
        with _CountOps() as counter:
            allocator.step()
        optimizer.zero_grad()
        return counter.reads

    model, optimizer, allocator = _setup(_config())
    _train(model, optimizer, allocator, 17)  # the final allocation at t = 16
    assert final_step(model, optimizer, allocator) == 0
    resumed_model, resumed_optimizer, resumed = _setup(_config())
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(allocator.state_dict())
    assert final_step(resumed_model, resumed_optimizer, resumed) == 0


def test_final_phase_after_compaction_has_nothing_to_mask():
    model, optimizer, allocator = _setup(_config(compact_at_final=True))
    _train(model, optimizer, allocator, 18)  # compacted at t = 16, final-phase steps since t = 17
    assert all(a.rank_mask.all() for a in allocator.adapters)
    F.cross_entropy(model(token_batch()).logits, LABELS).backward()
    optimizer.step()
    with _CountOps() as counter:
        allocator.step()
    assert counter.ops == 0


def test_final_phase_after_compacting_by_hand_trains_as_the_uncompacted_model():
    config = _config(orth_reg_weight=0.0)  # R over (d_out, r) and (d_out, k) factors differs by construction
    runs = [_setup(config), _setup(config)]
    for run in runs:
        torch.manual_seed(1)  # the same dropout in both
        _train(*run, 18)  # final phase, masks frozen, factors cast for the current lambdas
    (model, optimizer, allocator), (twin, twin_optimizer, twin_allocator) = runs
    compact(model, optimizer)  # replaces every P, E, Q: the cached factors no longer fit
    for run in runs:
        torch.manual_seed(2)
        _train(*run, 2)
    assert [a.r for a in allocator.adapters] == [a.kept_rank() for a in twin_allocator.adapters]
    assert any(a.r < 4 for a in allocator.adapters)
    model.eval(), twin.eval()
    torch.testing.assert_close(model(token_batch()).logits, twin(token_batch()).logits)


def test_a_masked_triplet_keeps_training_and_can_come_back():
    config = _config(importance="magnitude", orth_reg_weight=0.0)
    model, optimizer, allocator = _setup(config)
    _train(model, optimizer, allocator, 5)  # allocation at step 4
    adapter = allocator.adapters[0]
    masked = (~adapter.rank_mask).nonzero().flatten().tolist()
    assert masked and torch.all(adapter.E[masked] == 0)
    # P and Q of the masked triplet keep their values, and lambda still receives a gradient: the
    # optimizer moves it off zero before the next allocation.
    _train(model, optimizer, allocator, 1)
    assert torch.all(adapter.E[masked] != 0)
    # Make the masked triplet the most important of all (as training could): the next allocation keeps it.
    with torch.no_grad():
        adapter.E[masked[0]] = 10.0
    reports = _train(model, optimizer, allocator, 1)
    assert reports[0].allocation is not None
    assert adapter.rank_mask[masked[0]]


def test_resume_from_state_dicts_is_exact():
    config = _config()
    model, optimizer, allocator = _setup(config)
    _train(model, optimizer, allocator, 20)

    model_a, optimizer_a, allocator_a = _setup(config)
    _train(model_a, optimizer_a, allocator_a, 10)
    saved = {
        "model": {k: v.clone() for k, v in model_a.state_dict().items()},
        "optimizer": optimizer_a.state_dict(),
        "allocator": allocator_a.state_dict(),
        "rng": torch.get_rng_state(),  # dropout draws must continue where they stopped
    }
    del model_a, optimizer_a, allocator_a
    model_b, optimizer_b, allocator_b = _setup(config, seed=123)  # different init: everything must be loaded
    model_b.load_state_dict(saved["model"])
    optimizer_b.load_state_dict(saved["optimizer"])
    allocator_b.load_state_dict(saved["allocator"])
    torch.set_rng_state(saved["rng"])
    _train(model_b, optimizer_b, allocator_b, 10)

    assert allocator_b.history == allocator.history
    assert allocator_b.rank_pattern() == allocator.rank_pattern()
    for (name, a), b in zip(model.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_state_dict_rejects_another_layout_and_another_config():
    model, optimizer, allocator = _setup(_config())
    state = allocator.state_dict()
    other = RankAllocator(inject(tiny_bert(), _config(init_r=5)), _config(init_r=5))
    with pytest.raises(ValueError, match="same target_modules and init_r"):
        other.load_state_dict(state)
    _, _, changed = _setup(_config(beta1=0.5))
    with pytest.raises(ValueError, match="config differs"):
        changed.load_state_dict(state)


def test_paper_order_measures_importance_before_the_update():
    config = _config(importance_timing="before_step", importance="sensitivity")
    model, optimizer, allocator = _setup(config)
    adapter = allocator.adapters[0]
    with torch.no_grad():
        adapter.E.normal_()
    ids = token_batch()
    loss = F.cross_entropy(model(ids).logits, LABELS)
    loss.backward()
    expected = (adapter.E.detach() * adapter.E.grad).abs().clone()  # before the update
    optimizer.step()
    allocator.step()
    score_e = allocator.tracker.ibar[allocator.tracker.groups[0].e_offset : allocator.tracker.groups[0].e_offset + 4]
    torch.testing.assert_close(score_e, expected)
    after = (adapter.E.detach() * adapter.E.grad).abs()
    assert not torch.allclose(after, expected, rtol=1e-4, atol=0)


def test_paper_order_needs_the_optimizer():
    with pytest.raises(ValueError, match="needs the optimizer"):
        RankAllocator(inject(tiny_bert(), _config()), _config(importance_timing="before_step"))


def test_adapters_without_gradient_are_scored_zero_with_one_warning():
    config = _config(target_modules=["query", "pooler.dense"], orth_reg_weight=0.0)
    model, optimizer, allocator = _setup(config)
    ids = token_batch()
    with pytest.warns(RuntimeWarning, match="received no gradient.*pooler.dense"):
        for _ in range(6):
            hidden = model.bert(ids).last_hidden_state  # the pooler never runs: its adapter gets no grad
            (hidden[:, 0, :2].sum() + allocator.regularization()).backward()
            optimizer.step()
            allocator.step()
            optimizer.zero_grad()
    pooler = dict(zip(allocator.names, allocator.triplet_scores().values(), strict=True))["bert.pooler.dense"]
    assert torch.all(pooler == 0)


def test_stepping_after_zero_grad_is_an_error():
    model, optimizer, allocator = _setup(_config(), lr=1e-3)
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        allocator.step()


def test_micro_batch_stepping_warns_or_raises():
    model, optimizer, allocator = _setup(_config())
    ids = token_batch()
    with pytest.warns(RuntimeWarning, match="once per optimizer step"):
        for _ in range(2):
            for _micro in range(2):
                F.cross_entropy(model(ids).logits, LABELS).backward()
                allocator.step()  # wrong: per micro-batch
            optimizer.step()
            optimizer.zero_grad()
    model = inject(tiny_bert(), _config()).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    strict = RankAllocator(model, _config(), optimizer, on_misuse="error")
    F.cross_entropy(model(ids).logits, LABELS).backward()
    optimizer.step()
    strict.step()
    with pytest.raises(RuntimeError, match="not per micro-batch"):
        strict.step()


def test_forgetting_to_step_the_allocator_warns():
    model, optimizer, allocator = _setup(_config())
    ids = token_batch()
    with pytest.warns(RuntimeWarning, match="optimizer has taken 2 steps"):
        for _ in range(2):
            F.cross_entropy(model(ids).logits, LABELS).backward()
            optimizer.step()
            optimizer.zero_grad()


def test_training_past_total_steps_warns():
    model, optimizer, allocator = _setup(_config())
    _train(model, optimizer, allocator, 20)
    with pytest.warns(RuntimeWarning, match="past total_steps=20"):
        _train(model, optimizer, allocator, 1)


def test_non_finite_gradient_is_skipped_and_reported_once():
    model, optimizer, allocator = _setup(_config())
    ids = token_batch()
    F.cross_entropy(model(ids).logits, LABELS).backward()
    optimizer.step()
    allocator.step()
    optimizer.zero_grad()
    ibar = allocator.tracker.ibar.clone()
    F.cross_entropy(model(ids).logits, LABELS).backward()
    optimizer.step()
    allocator.adapters[0].Q.grad[0, 0] = float("inf")  # as if the step had overflowed (weights kept sane)
    allocator.step()  # step 1: skipped, no warning yet (no host sync outside allocation steps)
    optimizer.zero_grad()
    assert torch.equal(allocator.tracker.ibar, ibar)
    with pytest.warns(RuntimeWarning, match="skipped 1 importance update"):
        _train(model, optimizer, allocator, 3)  # reaches the allocation at step 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, optimizer, allocator, 2)


def test_target_total_rank_moves_rank_between_matrices():
    config = _config(target_r=None, target_total_rank=7)
    model, optimizer, allocator = _setup(config)
    _train(model, optimizer, allocator, 20)
    ranks = list(allocator.rank_pattern().values())
    assert sum(ranks) == 7
    assert len(set(ranks)) > 1  # the budget is global, not an equal share per matrix


def test_allocator_requires_adapters_and_total_steps():
    with pytest.raises(ValueError, match="no AdaLoRA adapters"):
        RankAllocator(nn.Linear(2, 2), _config())
    model = inject(tiny_bert(), _config())
    with pytest.raises(ValueError, match="total_steps is None"):
        RankAllocator(model, _config(total_steps=None))
    with pytest.raises(ValueError, match="target budget"):
        RankAllocator(model, _config(target_r=None, target_total_rank=10_000))


def test_rank_mask_travels_in_the_model_state_dict():
    model, optimizer, allocator = _setup(_config())
    _train(model, optimizer, allocator, 5)
    state = model.state_dict()
    fresh = inject(tiny_bert(), _config())
    fresh.load_state_dict(state)
    assert {n: a.kept_rank() for n, a in find_adapters(fresh)} == allocator.rank_pattern()


def test_resume_after_compaction_at_the_final_allocation():
    config = _config(compact_at_final=True, orth_reg_weight=0.0)
    model, optimizer, allocator = _setup(config)
    _train(model, optimizer, allocator, 20)

    model_a, optimizer_a, allocator_a = _setup(config)
    _train(model_a, optimizer_a, allocator_a, 18)  # past the final allocation (t = 16): adapters compacted
    assert [a.r for a in allocator_a.adapters] != [4] * len(allocator_a.adapters)
    saved = {
        "model": {k: v.clone() for k, v in model_a.state_dict().items()},
        "optimizer": optimizer_a.state_dict(),
        "allocator": allocator_a.state_dict(),
        "ranks": {n: a.r for n, a in zip(allocator_a.names, allocator_a.adapters, strict=True)},
        "rng": torch.get_rng_state(),
    }
    model_b = inject(tiny_bert(), config).train()
    resize_adapters(model_b, saved["ranks"])
    model_b.load_state_dict(saved["model"])
    optimizer_b = torch.optim.AdamW([p for p in model_b.parameters() if p.requires_grad], lr=1e-2)
    optimizer_b.load_state_dict(saved["optimizer"])
    allocator_b = RankAllocator(model_b, config, optimizer_b)
    allocator_b.load_state_dict(saved["allocator"])
    torch.set_rng_state(saved["rng"])
    _train(model_b, optimizer_b, allocator_b, 2)
    assert allocator_b.rank_pattern() == allocator.rank_pattern()
    for (name, a), b in zip(model.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    unresized = RankAllocator(inject(tiny_bert(), config), config, torch.optim.SGD([torch.zeros(1)], lr=0.1))
    with pytest.raises(ValueError, match="resize_adapters"):
        unresized.load_state_dict(saved["allocator"])
