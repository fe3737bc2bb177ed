"""Run under ``torchrun --standalone --nproc_per_node 2`` by tests/test_deepspeed.py: every DeepSpeed scenario in one
launch (starting DeepSpeed in a process costs seconds), each rank saving what it recorded to ``OUT/rank{r}.pt``.

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/deepspeed_script.py OUT``

The training run is tests/test_distributed.py's (same model, configuration, global batches and optimizer), with the
loop DeepSpeed asks for: ``engine(ids)``, ``engine.backward(loss)``, ``engine.step()``, ``allocator.step()``; the
regulariser is the allocator's business under DeepSpeed (added inside the engine's step).
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))  # conftest, test_distributed

WORLD = 2


def quiet_deepspeed() -> None:
    """Start DeepSpeed's process group over gloo without its shared-memory op.

    DeepSpeed's torch backend builds that op (``deepspeed_shm_comm``: a C++ extension compiled with g++ on first use,
    about 3.5 minutes on 2 cores) whenever it is marked compatible, although only tensor-parallel inference uses it.
    Marking it incompatible before the process group starts skips the build; training does not touch it.
    """
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.utils.logger.setLevel("WARNING")
    deepspeed.init_distributed(dist_backend="gloo")


def ds_config(stage: int, **zero: object) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, **zero},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build(config, ds: dict, seed: int = 0):
    """(engine, allocator) for tests/test_distributed.py's model, built identically on every rank."""
    import deepspeed
    from conftest import tiny_bert

    from adalora import RankAllocator, inject

    torch.manual_seed(seed)
    model = inject(tiny_bert(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    allocator = RankAllocator(engine, config, on_misuse="error", check_consistency=True)
    return engine, allocator


def module_lambdas(engine) -> dict[str, torch.Tensor]:
    """The module's own copy of every lambda (what the next forward pass uses), whole."""
    import deepspeed

    from adalora import find_adapters

    adapters = find_adapters(engine)
    lambdas = [a.E for _, a in adapters]
    partitioned = any(hasattr(e, "ds_id") for e in lambdas)
    with deepspeed.zero.GatheredParameters(lambdas) if partitioned else nullcontext():
        return {f"{name}.E": a.E.detach().clone().float() for name, a in adapters}


def train(engine, allocator, rows: slice, steps: range, out: Path | None = None) -> dict:
    """Train ``steps`` on ``rows`` of each global batch; what the tests compare (whole master copies and modules)."""
    import test_distributed as td

    from adalora import find_adapters
    from adalora.files.peft import export_peft
    from adalora.parallel import gathered_adapters, is_main_process, mask_fingerprint, save_adapter_collective

    fingerprints, reports = {}, []
    for step in steps:
        ids, labels = (t[rows] for t in td._batch(step))
        loss = F.cross_entropy(engine(ids).logits, labels)
        engine.backward(loss)
        engine.step()
        report = allocator.step()
        reports.append((report.step, report.phase, report.budget))
        if report.allocation is not None:
            fingerprints[step] = mask_fingerprint([a.rank_mask for a in allocator.adapters])
    with gathered_adapters(engine, td.CONFIG) as model:
        tensors = {}
        for name, adapter in find_adapters(model):
            for attr in ("P", "E", "Q", "rank_mask"):
                tensors[f"{name}.{attr}"] = getattr(adapter, attr).detach().clone()
        tensors["classifier.weight"] = model.classifier.weight.detach().clone()
        if out is not None and is_main_process():
            export_peft(model, out / "peft", td.CONFIG)
    if out is not None:
        save_adapter_collective(engine, out / "adapter", td.CONFIG)
    return {
        "names": allocator.names,
        "layout": type(allocator.layout).__name__,
        "fingerprints": fingerprints,
        "history": [(a.step, a.budget, a.ranks) for a in allocator.history],
        "reports": reports,
        "tensors": tensors,
        "module_lambdas": module_lambdas(engine),
        "state": allocator.state_dict(),
    }


def plain_loop(out: Path, rank: int) -> dict:
    """ZeRO-1/2/3 (and ZeRO-3 with small parameters persistent, its default) against one process; a resume."""
    import test_distributed as td

    half = td.GLOBAL_BATCH // WORLD
    rows = slice(rank * half, (rank + 1) * half)
    results: dict = {"time": {}}
    modes = {
        "zero1": ds_config(1),
        "zero2": ds_config(2),
        "zero3": ds_config(3, stage3_param_persistence_threshold=0),  # every parameter partitioned
        "zero3-persistent": ds_config(3),  # the adapters' small tensors stay whole (DeepSpeed's default)
    }
    for mode, ds in modes.items():
        start = time.perf_counter()
        engine, allocator = build(td.CONFIG, ds)
        results[mode] = train(engine, allocator, rows, range(td.STEPS), out / mode)
        results["time"][mode] = time.perf_counter() - start
    return results


def main(out: Path) -> None:
    quiet_deepspeed()
    torch.set_num_threads(1)
    rank = torch.distributed.get_rank()
    results = {"world": torch.distributed.get_world_size()}
    results.update(plain_loop(out, rank))
    torch.save(results, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
