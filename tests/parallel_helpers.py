"""The data-parallel tests' training run, shared by tests/parallel/test_distributed.py, tests/parallel/test_zero.py
and the scripts they launch (deepspeed_script.py): one tiny BERT, one configuration and one global batch per step,
trained in one process or in each of WORLD processes on its rows of the batch."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import small_config, tiny_bert

from adalora import AdaLoRAConfig, RankAllocator, find_adapters, inject
from adalora.parallel import is_main_process, mask_fingerprint, save_adapter_collective

WORLD = 2
STEPS = 30
GLOBAL_BATCH = 8  # each of the 2 ranks trains on 4 rows; DDP averages the two means = the mean over 8
# Uneven shards on purpose: init_r = 5 splits 3/2 over two processes, as does the classifier's 2 rows.
CONFIG = small_config(
    target_modules=("query", "value", "intermediate.dense"),
    init_r=5,
    target_r=3,
    warmup_steps=4,
    final_steps=6,
    mask_interval=2,
    total_steps=STEPS,
)
# Summation order differs (two half-batch means averaged vs one mean; sharded score sums): float noise only
# (measured: at most 1e-7 on entries of size 1e-2 to 1e-1).
ATOL, RTOL = 1e-6, 1e-4
CPU = torch.device("cpu")


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 100, (GLOBAL_BATCH, 8), generator=generator)
    labels = torch.randint(0, 2, (GLOBAL_BATCH,), generator=generator)
    return ids, labels


def build(mode: str, config: AdaLoRAConfig, device: torch.device, mesh=None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(model to train, model that holds the adapters); dropout off (eval mode) so that runs are comparable."""
    torch.manual_seed(0)
    model = inject(tiny_bert(), config).to(device)  # eval(): no dropout, gradients still flow
    if mode == "ddp":
        device_ids = None if device.type == "cpu" else [device]
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids), model
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if mesh is None:  # explicit: without a mesh FSDP2 picks CUDA whenever the machine has a GPU
            mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for layer in model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, model


def full(tensor: torch.Tensor) -> torch.Tensor:
    full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach().clone()
    return full.detach().cpu()


def train(
    mode: str,
    rows: slice,
    check: bool = True,
    config: AdaLoRAConfig = CONFIG,
    save_to: Path | None = None,
    device: torch.device = CPU,
    mesh=None,
) -> dict:
    """Train for STEPS optimizer steps on ``rows`` of each global batch; return what the test compares.

    With ``save_to``, every process then calls the rank-aware ``adalora.parallel.save_adapter_collective``.
    """
    model, inner = build(mode, config, device, mesh)
    # Adam moves every adapter entry by about lr per step: the adapters train visibly in 30 steps.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    allocator = RankAllocator(model, config, optimizer, on_misuse="error", check_consistency=check)
    fingerprints = {}
    for step in range(STEPS):
        ids, labels = (t[rows].to(device) for t in batch(step))
        loss = F.cross_entropy(model(ids).logits, labels) + allocator.regularization()
        loss.backward()
        optimizer.step()
        report = allocator.step()
        optimizer.zero_grad()
        if report.allocation is not None:
            fingerprints[step] = mask_fingerprint([a.rank_mask for a in allocator.adapters])
    tensors = {}
    for name, adapter in find_adapters(inner):
        for attr in ("P", "E", "Q", "rank_mask"):
            tensors[f"{name}.{attr}"] = full(getattr(adapter, attr))
    tensors["classifier.weight"] = full(inner.classifier.weight)
    if save_to is not None:
        returned = save_adapter_collective(model, save_to, config)
        assert (returned is not None) == is_main_process()
    return {
        "names": allocator.names,
        "layout": type(allocator.layout).__name__,
        "fingerprints": fingerprints,
        "history": [(a.step, a.budget, a.ranks) for a in allocator.history],
        "tensors": tensors,
    }
