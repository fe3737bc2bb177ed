"""DeepSpeed ZeRO: 2 processes (gloo, CPU) against the single-process run on the same global batches.

One ``torchrun --standalone --nproc_per_node 2`` launch of tests/deepspeed_script.py runs every scenario (starting
DeepSpeed costs seconds per process); the module-scoped fixture then computes the single-process references here:

- a plain ``deepspeed.initialize`` loop under ZeRO-1, ZeRO-2 and ZeRO-3 (every parameter partitioned, and DeepSpeed's
  default that keeps small tensors whole), with importance in the reference and the paper's order and by magnitude:
  allocation history, masks at every allocation (10, the last one the final allocation), the final adapter (fp32
  master copies) and the module's own lambdas equal the one-process run; the saved adapter and its PEFT export give
  the same files; in bf16, masked lambdas are zero in both copies;
- the control: the same ZeRO-2 run masked PEFT's way (``masked_fill_`` on the module's lambda only) does *not* match,
  its masked triplets come back: the comparison above catches that bug;
- resuming through ``engine.save_checkpoint``/``load_checkpoint`` (ZeRO-2 mid-schedule, ZeRO-3 in the final phase)
  ends where the uninterrupted run ends;
- the Trainer with ``deepspeed=`` (ZeRO-2, ZeRO-3) and :class:`AdaLoRACallback`, resumed from its own checkpoint
  too, and a plain accelerate loop with a DeepSpeed plugin, against the same runs in one process;
- what is refused says so in one line, on every rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import deepspeed_script
import parallel_helpers as shared
import pytest
import torch
from conftest import tiny_bert
from safetensors.torch import load_file

from adalora import RankAllocator, SVDAdapter, inject
from adalora.files.adapter import WEIGHTS_NAME, read_adapter_config
from adalora.files.export_source import ExportSource
from adalora.files.peft import write_peft
from adalora.integrations.loop import fit
from adalora.parallel import ZeroLayout, layout_for
from adalora.parallel.zero import StepHooks, unsupported

pytest.importorskip("deepspeed")

WORLD = deepspeed_script.WORLD
ATOL, RTOL = shared.ATOL, shared.RTOL
PLAIN_MODES = tuple(deepspeed_script.PLAIN)


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo" if sys.platform == "linux" else "lo0"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD)]
    command += [deepspeed_script.__file__, str(tmp)]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    launch = time.perf_counter() - start
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = {"": shared.train("single", slice(None), check=False, save_to=tmp / "single" / "adapter")}
        write_peft(ExportSource.from_adapter_dir(tmp / "single" / "adapter"), tmp / "single" / "peft")
        for changes, _, _ in deepspeed_script.PLAIN.values():
            key = json.dumps(changes)
            if changes and key not in single:
                single[key] = shared.train("single", slice(None), check=False, config=shared.CONFIG.replace(**changes))
        trainer = deepspeed_script.run_trainer(tmp / "single-trainer", 1, None)
    finally:
        torch.set_num_threads(threads)
    log = done.stdout + done.stderr
    return {"dir": tmp, "ranks": ranks, "single": single, "trainer": trainer, "launch": launch, "log": log}


def reference(launched: dict, mode: str = "zero2") -> dict:
    """The single-process run with the configuration of ``mode``."""
    changes = deepspeed_script.PLAIN[mode][0]
    return launched["single"][json.dumps(changes) if changes else ""]


def assert_tensors_close(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() >= expected.keys(), what
    for key, value in expected.items():
        torch.testing.assert_close(actual[key].float(), value.float(), atol=ATOL, rtol=RTOL, msg=f"{what} {key}")


# ---------------------------------------------------------------------- the plain loop
@pytest.mark.slow
@pytest.mark.parametrize("mode", PLAIN_MODES)
def test_allocations_match_one_process(launched, mode):
    single = reference(launched, mode)
    assert len(single["fingerprints"]) == 10 and max(single["fingerprints"]) == shared.STEPS - shared.CONFIG.final_steps
    for rank in launched["ranks"]:
        run = rank["plain"][mode]
        assert run["layout"] == "ZeroLayout" and run["names"] == single["names"]
        assert run["history"] == single["history"]
        assert run["fingerprints"] == single["fingerprints"]  # every allocation, the final one included


@pytest.mark.slow
@pytest.mark.parametrize("mode", PLAIN_MODES)
def test_master_and_module_copies_match_one_process(launched, mode):
    single = reference(launched, mode)["tensors"]
    assert max(float(t.abs().max()) for k, t in single.items() if k.endswith(".E")) > 1e-2  # trained visibly
    for rank in launched["ranks"]:
        run = rank["plain"][mode]
        assert_tensors_close(run["tensors"], single, f"{mode} master")
        lambdas = {k: v for k, v in single.items() if k.endswith(".E")}
        assert_tensors_close(run["module_lambdas"], lambdas, f"{mode} module")
        assert_masked_in_both_copies(run)


def assert_masked_in_both_copies(run: dict) -> None:
    """Every triplet the final allocation masked has lambda exactly 0 in the master copy and in the module."""
    masked = 0
    for key, value in run["module_lambdas"].items():
        mask = run["tensors"][key.removesuffix(".E") + ".rank_mask"]
        assert bool((value[~mask] == 0).all()) and bool((run["tensors"][key][~mask] == 0).all()), key
        masked += int((~mask).sum())
    assert masked == sum(shared.CONFIG.init_r - r for r in run["history"][-1][2]) > 0


@pytest.mark.slow
def test_bf16_keeps_masks_in_both_copies(launched):
    for rank in launched["ranks"]:
        run = rank["plain"]["zero2-bf16"]
        assert len(run["history"]) == 10
        assert all(t.dtype == torch.float32 for t in run["tensors"].values() if t.is_floating_point())  # masters
        assert_masked_in_both_copies(run)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_saved_adapter_and_export_match_one_process(launched, mode):
    single, saved = launched["dir"] / "single", launched["dir"] / mode
    expected, actual = read_adapter_config(single / "adapter"), read_adapter_config(saved / "adapter")
    for field in ("modules", "config", "modules_to_save_tensors", "tensors", "base_model"):
        assert actual[field] == expected[field], field  # ranks, names, shapes, the base model's fingerprint
    for name in (f"adapter/{WEIGHTS_NAME}", "peft/adapter_model.safetensors"):
        assert_tensors_close(load_file(saved / name), load_file(single / name), name)
    peft = json.loads((saved / "peft" / "adapter_config.json").read_text())
    assert peft == json.loads((single / "peft" / "adapter_config.json").read_text())


@pytest.mark.slow
def test_peft_style_masking_is_undone_and_caught(launched):
    """The control: masking the module's lambda alone is undone by ZeRO's next step; the test above fails on it."""
    single = reference(launched)["tensors"]
    for rank in launched["ranks"]:
        control = rank["peft_masking"]
        revived = [
            key
            for key, value in control["tensors"].items()
            if key.endswith(".E") and bool(value[~control["tensors"][key[:-2] + ".rank_mask"]].ne(0).any())
        ]
        assert revived  # masked triplets came back at full value in the master copy
        with pytest.raises(AssertionError):
            assert_tensors_close(control["tensors"], single, "control")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_resume_through_deepspeed_checkpoints(launched, mode):
    for rank in launched["ranks"]:
        resumed, straight = rank["resumed"][mode], rank["plain"][mode]
        assert resumed["history"] == straight["history"] == reference(launched)["history"]
        assert resumed["state"]["final"] == straight["state"]["final"] is True
        for key, value in straight["tensors"].items():
            torch.testing.assert_close(resumed["tensors"][key], value, atol=1e-7, rtol=0, msg=f"{mode} {key}")


# ---------------------------------------------------------------------- the Trainer and accelerate
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero2", "zero3", "zero2-resumed"])
def test_trainer_with_deepspeed_matches_one_process(launched, mode):
    single = launched["trainer"]
    for rank in launched["ranks"]:
        run = rank["trainer"][mode]
        assert run["layout"] == "ZeroLayout"
        assert run["history"] == single["history"] and run["ranks"] == single["ranks"]
        assert_tensors_close(run["state"], single["state"], mode)
    for step in (6, 12):  # the allocator's state, once per checkpoint (the same on every process)
        files = sorted(p.name for p in (launched["dir"] / "trainer-zero2" / f"checkpoint-{step}").glob("adalora_*"))
        assert files == ["adalora_allocator.pt"]


@pytest.mark.slow
def test_accelerate_with_a_deepspeed_plugin_matches_one_process(launched):
    single = reference(launched)
    for rank in launched["ranks"]:
        run = rank["accelerate"]
        assert run["engine"] == "DeepSpeedEngine" and run["history"] == single["history"]
        assert_tensors_close(run["tensors"], single["tensors"], "accelerate")


# ---------------------------------------------------------------------- refusals, on every rank
@pytest.mark.slow
def test_what_is_not_supported_is_refused_in_one_line_on_every_rank(launched):
    errors = [rank["misuse"] for rank in launched["ranks"]]
    assert errors[0] == errors[1]
    refused = errors[0]
    assert "DeepSpeed offloading (offload_optimizer / offload_param) is not supported." in refused["offload"]
    assert "Supported under DeepSpeed: ZeRO stages 1, 2 and 3" in refused["offload"]
    assert "compact_at_final=True is not supported with several processes or DeepSpeed" in refused["compact"]
    assert "do not add regularization() to the loss" in refused["loss_form"]
    assert "the gradients of this step were never read" in refused["no_engine_step"]
    assert "ZeRO-3 partitions this model's adapters" in refused["partitioned_save"]
    assert all("\n" not in message for message in refused.values())


@pytest.mark.slow
def test_the_shared_memory_op_is_not_built(launched):
    assert "deepspeed_shm_comm" not in launched["log"] and "Building extension" not in launched["log"]


# ---------------------------------------------------------------------- one process, stand-ins
class DeepSpeedZeroOptimizer:
    """Stands in for ZeRO-1/2's optimizer: a class from the deepspeed package with a ``step``, holding the torch
    optimizer that updates its fp32 partitions as ``.optimizer``."""

    __module__ = "deepspeed.runtime.zero.stage_1_and_2"

    def __init__(self, **flags: object) -> None:
        self.calls: list[str] = []
        self.optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        self.__dict__.update(flags)

    def step(self) -> None:
        self.calls.append("step")


class DeepSpeedEngine(torch.nn.Module):
    __module__ = "deepspeed.runtime.engine"

    def __init__(self, module: torch.nn.Module, optimizer: object) -> None:
        super().__init__()
        self.module, self.optimizer = module, optimizer


CONFIG = shared.CONFIG.replace(modules_to_save=())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"cpu_offload": True}, "DeepSpeed offloading"),
        ({"offload_param": True}, "DeepSpeed offloading"),
        ({"dtype": torch.float16}, "DeepSpeed fp16"),
    ],
)
def test_unsupported_optimizers_are_refused(flags, message):
    model = inject(tiny_bert(), CONFIG)
    with pytest.raises(ValueError, match=f"RankAllocator: {message}.*Supported under DeepSpeed"):
        RankAllocator(DeepSpeedEngine(model, DeepSpeedZeroOptimizer(**flags)), CONFIG)


def test_deepspeed_without_zero_and_quantized_bases_are_refused(monkeypatch):
    model = inject(tiny_bert(), CONFIG)
    adapters = [m for m in model.modules() if hasattr(m, "rank_mask")]

    class BF16_Optimizer(DeepSpeedZeroOptimizer):  # DeepSpeed's name
        pass

    assert "DeepSpeed's BF16_Optimizer" in unsupported(BF16_Optimizer(), adapters)
    monkeypatch.setattr("adalora.parallel.zero.QuantizedAdapter", SVDAdapter)  # every adapter counts as quantized
    assert "a quantized base layer" in unsupported(DeepSpeedZeroOptimizer(), adapters)


def test_deepspeed_is_found_behind_accelerates_wrapper_and_on_partitioned_parameters():
    model = inject(tiny_bert(), CONFIG)
    adapters = [m for m in model.modules() if hasattr(m, "rank_mask")]
    zero = DeepSpeedZeroOptimizer()
    wrapper = SimpleNamespace(optimizer=zero)  # accelerate's DeepSpeedOptimizerWrapper holds it as .optimizer
    layout = layout_for(model, wrapper, adapters)
    assert isinstance(layout, ZeroLayout) and layout.optimizer is zero and not layout.gradients_outlive_step
    adapters[0].P.ds_id = 0  # what ZeRO-3 puts on every partitioned parameter
    with pytest.raises(ValueError, match="neither its engine nor its optimizer was given"):
        layout_for(model, None, adapters)


def test_step_hooks_wrap_the_step_once_in_order():
    optimizer = DeepSpeedZeroOptimizer()
    hooks = StepHooks.of(optimizer)
    assert StepHooks.of(optimizer) is hooks  # a second allocator reuses the wrapper
    pre = hooks.register_step_pre_hook(lambda opt, args, kwargs: opt.calls.append("pre"))
    hooks.register_step_post_hook(lambda opt, args, kwargs: opt.calls.append("post"))
    optimizer.step()
    pre.remove()
    optimizer.step()
    assert optimizer.calls == ["pre", "step", "post", "step", "post"]


def test_lightning_refuses_deepspeed():
    from adalora.integrations.lightning import AdaLoRALightningCallback

    model = inject(tiny_bert(), CONFIG)
    trainer = SimpleNamespace(
        estimated_stepping_batches=shared.STEPS, optimizers=[DeepSpeedZeroOptimizer()], global_step=0
    )
    with pytest.raises(ValueError, match="Lightning's DeepSpeed strategy is not supported"):
        AdaLoRALightningCallback(CONFIG.replace(total_steps=None)).on_train_start(trainer, model)


def test_fit_refuses_a_deepspeed_engine():
    model = inject(tiny_bert(), CONFIG)
    engine = DeepSpeedEngine(model, DeepSpeedZeroOptimizer())
    with pytest.raises(ValueError, match=r"fit: DeepSpeed trains with engine.backward\(loss\) and engine.step\(\)"):
        fit(engine, [], torch.optim.SGD(model.parameters(), lr=0.1))
