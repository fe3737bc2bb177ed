"""GPU-only checks (skipped without CUDA): no host-device synchronisation outside allocation steps."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert, token_batch

from adalora import AdaLoRAConfig, RankAllocator, inject

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_allocator_step_synchronises_only_when_it_allocates():
    config = AdaLoRAConfig(
        target_modules=["query", "value", "dense"],
        init_r=6,
        target_r=3,
        warmup_steps=2,
        final_steps=4,
        mask_interval=3,
        total_steps=16,
    )
    model = inject(tiny_bert(), config).cuda().train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    allocator = RankAllocator(model, config, optimizer)
    ids, labels = token_batch().cuda(), torch.tensor([0, 1, 1, 0]).cuda()
    synced_steps = []
    for t in range(config.total_steps):
        loss = F.cross_entropy(model(ids).logits, labels) + allocator.regularization()
        loss.backward()
        optimizer.step()
        allocating = allocator.decision(t).allocate
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if not allocating else "default")
        try:
            report = allocator.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if report.allocation is not None:
            synced_steps.append(t)
        optimizer.zero_grad()
    assert synced_steps == [3, 6, 9, 12]
    assert sum(allocator.rank_pattern().values()) == 3 * len(allocator.adapters)
    assert allocator.tracker.ibar is None  # freed at the final allocation


def test_non_finite_update_is_skipped_on_the_gpu_without_a_sync():
    from adalora.importance import ImportanceTracker
    from adalora.layers import SVDLinear

    adapters = [SVDLinear.from_base(torch.nn.Linear(6, 4).cuda(), r=3, scale=1.0) for _ in range(2)]
    tracker = ImportanceTracker(adapters, "smoothed", 0.85, 0.85)
    grads = [torch.randn_like(p) for p in tracker.parameters()]
    tracker.update(grads)
    ibar, ubar = tracker.ibar.clone(), tracker.ubar.clone()
    grads[1][0] = float("nan")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tracker.update(grads)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(tracker.ibar, ibar) and torch.equal(tracker.ubar, ubar)
    assert int(tracker.skipped) == 1
