"""Run under ``torchrun --standalone --nproc_per_node 2`` by tests/parallel/test_zero.py: every DeepSpeed scenario in
one launch (starting DeepSpeed in a process costs seconds), each rank saving what it recorded to ``OUT/rank{r}.pt``.

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/deepspeed_script.py OUT``

The training run is tests/parallel_helpers.py's (same model, configuration, global batches and optimizer), with the
loop DeepSpeed asks for: ``engine(ids)``, ``engine.backward(loss)``, ``engine.step()``, ``allocator.step()``; the
regulariser is the allocator's business under DeepSpeed (added inside the engine's step).
"""

from __future__ import annotations

import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))  # tests/: conftest, parallel_helpers
import parallel_helpers as shared

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
    """(engine, allocator) for tests/parallel_helpers.py's model, built identically on every rank."""
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

    from adalora import find_adapters
    from adalora.files.peft import export_peft
    from adalora.parallel import gathered_adapters, is_main_process, mask_fingerprint, save_adapter_collective

    fingerprints, reports = {}, []
    for step in steps:
        ids, labels = (t[rows] for t in shared.batch(step))
        loss = F.cross_entropy(engine(ids).logits, labels)
        engine.backward(loss)
        engine.step()
        report = allocator.step()
        reports.append((report.step, report.phase, report.budget))
        if report.allocation is not None:
            fingerprints[step] = mask_fingerprint([a.rank_mask for a in allocator.adapters])
    with gathered_adapters(engine, shared.CONFIG) as model:
        tensors = {}
        for name, adapter in find_adapters(model):
            for attr in ("P", "E", "Q", "rank_mask"):
                tensors[f"{name}.{attr}"] = getattr(adapter, attr).detach().clone()
        tensors["classifier.weight"] = model.classifier.weight.detach().clone()
        if out is not None and is_main_process():
            export_peft(model, out / "peft", shared.CONFIG)
    if out is not None:
        save_adapter_collective(engine, out / "adapter", shared.CONFIG)
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


def rows_of(rank: int) -> slice:
    half = shared.GLOBAL_BATCH // WORLD
    return slice(rank * half, (rank + 1) * half)


PLAIN = {  # mode: (what the configuration changes, ZeRO stage, DeepSpeed settings)
    "zero1": ({}, 1, {}),
    "zero2": ({}, 2, {}),
    "zero3": ({}, 3, {"stage3_param_persistence_threshold": 0}),  # every parameter partitioned
    "zero3-persistent": ({}, 3, {}),  # DeepSpeed's default: tensors under 1e5 elements stay whole
    "zero2-before_step": ({"importance_timing": "before_step"}, 2, {}),  # the paper's order
    "zero3-magnitude": ({"importance": "magnitude"}, 3, {"stage3_param_persistence_threshold": 0}),  # no gradients
}


def plain_loop(out: Path, rank: int) -> dict:
    """The :data:`PLAIN` runs, compared with one process by the tests; and one in bf16, which has no one-process
    twin (DeepSpeed keeps fp32 masters of a bf16 module): its masks must hold in both copies all the same."""
    results: dict = {"time": {}}
    for mode, (changes, stage, zero) in PLAIN.items():
        start = time.perf_counter()
        engine, allocator = build(shared.CONFIG.replace(**changes), ds_config(stage, **zero))
        results[mode] = train(engine, allocator, rows_of(rank), range(shared.STEPS), out / mode)
        results["time"][mode] = time.perf_counter() - start
    bf16 = {**ds_config(2), "bf16": {"enabled": True}}
    engine, allocator = build(shared.CONFIG, bf16)
    results["zero2-bf16"] = train(engine, allocator, rows_of(rank), range(shared.STEPS))
    return results


def peft_masking(out: Path, rank: int) -> dict:
    """The control: ZeRO-2 with masks applied PEFT's way, ``masked_fill_`` on the module's lambda only."""
    engine, allocator = build(shared.CONFIG, ds_config(2))

    @torch.no_grad()
    def module_only(*_args: object) -> None:
        for adapter in allocator.adapters:
            adapter.E.masked_fill_(~adapter.rank_mask, 0.0)

    allocator.layout.mask = module_only  # type: ignore[method-assign]
    allocator.layout.reapply_masks = module_only  # type: ignore[method-assign]
    return train(engine, allocator, rows_of(rank), range(shared.STEPS))


def resumed(out: Path, rank: int) -> dict:
    """Stop at step ``at``, save a DeepSpeed checkpoint with the allocator's state as client state, rebuild
    everything from other initial weights, load, and finish: ZeRO-2 mid-schedule, ZeRO-3 in the final phase."""
    results = {}
    for mode, ds, at in (
        ("zero2", ds_config(2), 14),
        ("zero3", ds_config(3, stage3_param_persistence_threshold=0), 26),
    ):
        engine, allocator = build(shared.CONFIG, ds)
        train(engine, allocator, rows_of(rank), range(at))
        engine.save_checkpoint(
            str(out / f"checkpoint-{mode}"), tag=f"step{at}", client_state={"adalora": allocator.state_dict()}
        )
        engine, allocator = build(shared.CONFIG, ds, seed=1)
        _, client = engine.load_checkpoint(str(out / f"checkpoint-{mode}"), tag=f"step{at}")
        allocator.load_state_dict(client["adalora"])
        results[mode] = train(engine, allocator, rows_of(rank), range(at, shared.STEPS))
    return results


def misuse(out: Path, rank: int) -> dict:
    """What is refused, each as the one line every rank raised (none may hang in a collective)."""

    from adalora import save_adapter

    errors = {}

    def record(key: str, action) -> None:
        try:
            action()
            errors[key] = None
        except (ValueError, RuntimeError) as error:
            errors[key] = f"{type(error).__name__}: {error}"

    offload = ds_config(2, offload_optimizer={"device": "cpu"})
    offload["zero_force_ds_cpu_optimizer"] = False  # DeepSpeed's CPU Adam would be compiled otherwise
    record("offload", lambda: build(shared.CONFIG, offload))
    record("compact", lambda: build(shared.CONFIG.replace(compact_at_final=True), ds_config(2)))
    engine, allocator = build(shared.CONFIG, ds_config(2))
    record("loss_form", allocator.regularization)
    zero3, _ = build(shared.CONFIG, ds_config(3, stage3_param_persistence_threshold=0))
    record("partitioned_save", lambda: save_adapter(zero3, out / "not-saved", shared.CONFIG))
    train(engine, allocator, rows_of(rank), range(2))
    allocator.misuse.on_misuse = "warn"  # past the pairing's own report: the allocator has no gradients to read
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record("no_engine_step", allocator.step)  # the engine did not step since the allocator's last step
    return errors


def run_trainer(output_dir: Path, world: int, stage: int | None, resume: Path | None = None) -> dict:
    """tests/distributed_script.py's Trainer run (12 steps, 2 accumulated micro-batches, checkpoints at 6 and 12),
    with ``transformers.Trainer`` and :class:`AdaLoRACallback`, and ``deepspeed=`` a ZeRO ``stage`` configuration
    unless ``stage`` is None."""
    from distributed_script import TRAINER_CONFIG, trainer_arguments, trainer_data
    from transformers import Trainer

    from adalora import AdaLoRAConfig, find_adapters
    from adalora.integrations.trainer import AdaLoRACallback
    from adalora.parallel import gathered_adapters

    config = AdaLoRAConfig(**TRAINER_CONFIG)
    dataset, model = trainer_data(seed=0 if resume is None else 1)  # resumed: the weights come from the checkpoint
    deepspeed = None
    if stage is not None:
        zero = {"stage": stage, "stage3_param_persistence_threshold": 0}
        deepspeed = {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "zero_optimization": zero,
            "steps_per_print": 10**9,
        }
    # DeepSpeed clips inside its step, the Trainer before its callbacks: compare unclipped runs
    args = trainer_arguments(output_dir, world, max_grad_norm=0.0, deepspeed=deepspeed)
    callback = AdaLoRACallback(config, on_misuse="error")
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    with gathered_adapters(trainer.model_wrapped, config) as whole:
        state = {
            f"{name}.{attr}": getattr(adapter, attr).detach().clone()
            for name, adapter in find_adapters(whole)
            for attr in ("P", "E", "Q", "rank_mask")
        }
    return {
        "ranks": callback.allocator.rank_pattern(),
        "history": [(a.step, a.budget, a.ranks) for a in callback.allocator.history],
        "layout": type(callback.allocator.layout).__name__,
        "state": state,
    }


def trainers(out: Path, rank: int) -> dict:
    results = {}
    for stage in (2, 3):
        results[f"zero{stage}"] = run_trainer(out / f"trainer-zero{stage}", WORLD, stage)
    # Resume from a copy of the step-6 checkpoint in a new output directory (where the callback looks for its file).
    resumed = out / "trainer-zero2-resumed" / "checkpoint-6"
    if rank == 0:
        shutil.copytree(out / "trainer-zero2" / "checkpoint-6", resumed)
    torch.distributed.barrier()
    results["zero2-resumed"] = run_trainer(resumed.parent, WORLD, 2, resume=resumed)
    return results


def accelerated(out: Path, rank: int) -> dict:
    """A plain accelerate loop with a DeepSpeed plugin (ZeRO-2), as ``accelerate launch --use_deepspeed`` runs it."""
    import os

    from accelerate import Accelerator, DeepSpeedPlugin, PartialState
    from conftest import tiny_bert

    from adalora import RankAllocator, find_adapters, inject
    from adalora.parallel import gathered_adapters

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what accelerate launch --use_deepspeed sets
    PartialState(cpu=True)  # on a CPU, the process group accelerate sees (without it: one process)
    plugin = DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=1)
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = shared.GLOBAL_BATCH // WORLD
    accelerator = Accelerator(deepspeed_plugin=plugin)
    torch.manual_seed(0)
    model = inject(tiny_bert(), shared.CONFIG)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    allocator = RankAllocator(model, shared.CONFIG, optimizer, on_misuse="error", check_consistency=True)
    for step in range(shared.STEPS):
        ids, labels = (t[rows_of(rank)] for t in shared.batch(step))
        accelerator.backward(F.cross_entropy(model(ids).logits, labels))  # steps the engine
        optimizer.step()  # a no-op under DeepSpeed, as is zero_grad
        allocator.step()
        optimizer.zero_grad()
    with gathered_adapters(model, shared.CONFIG) as whole:
        tensors = {
            f"{name}.{attr}": getattr(adapter, attr).detach().clone()
            for name, adapter in find_adapters(whole)
            for attr in ("P", "E", "Q", "rank_mask")
        }
        tensors["classifier.weight"] = whole.classifier.weight.detach().clone()
    return {
        "engine": type(model).__name__,
        "history": [(a.step, a.budget, a.ranks) for a in allocator.history],
        "tensors": tensors,
    }


SCENARIOS = {
    "plain": plain_loop,
    "peft_masking": peft_masking,
    "resumed": resumed,
    "misuse": misuse,
    "accelerate": accelerated,
    "trainer": trainers,
}


def main(out: Path) -> None:
    quiet_deepspeed()
    torch.set_num_threads(1)
    rank = torch.distributed.get_rank()
    results: dict = {"world": torch.distributed.get_world_size(), "seconds": {}}
    for name, scenario in SCENARIOS.items():
        start = time.perf_counter()
        results[name] = scenario(out, rank)
        results["seconds"][name] = time.perf_counter() - start
    torch.save(results, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
