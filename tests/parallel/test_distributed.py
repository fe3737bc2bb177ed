"""Data-parallel training: 2 processes (gloo, loopback) against the single-process run on the same global batch.

One spawn of two worker processes runs every allocator-level scenario (starting a process that imports torch and
transformers costs seconds on a busy machine); the module-scoped fixture collects what each rank recorded and
the tests below check it:

- DDP: the masks agree across ranks at every allocation (the built-in consistency check is on and the mask
  fingerprints are compared here too), equal the single-process masks, and the trained and saved adapters are
  allclose to the single-process ones;
- FSDP2 (``fully_shard``, sharded P/E/Q and sharded importance statistics): the same, on CPU with gloo;
- the consistency check raises on every rank (no hang) when ranks disagree: crafted masks and steps, and two
  processes training without DDP.

One ``torchrun --standalone --nproc_per_node 2`` launch of tests/distributed_script.py then runs ``adalora train``
and an ``AdaLoRATrainer`` unchanged, compared with the same runs in this process. A CUDA variant runs only where
a GPU is present.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import tiny_bert
from parallel_helpers import ATOL, CONFIG, GLOBAL_BATCH, RTOL, WORLD, batch, train

from adalora import RankAllocator, inject
from adalora.files.adapter import read_adapter_config
from adalora.layers import unwrap_model
from adalora.parallel import (
    ConsistencyError,
    check_allocation_consistency,
    is_main_process,
    mask_fingerprint,
)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


# ---------------------------------------------------------------------- the worker processes
def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(60))
    half = GLOBAL_BATCH // WORLD
    rows = slice(rank * half, (rank + 1) * half)
    results: dict = {"main": is_main_process(), "time": {}}
    for mode in ("ddp", "fsdp", "fsdp-magnitude"):
        start = time.perf_counter()
        config = CONFIG.replace(importance="magnitude") if mode.endswith("magnitude") else CONFIG
        results[mode] = train(mode.split("-")[0], rows, config=config, save_to=Path(out) / f"{mode}-adapter")
        results["time"][mode] = time.perf_counter() - start

    # An allocator built before fully_shard tracks the parameters FSDP replaces: a clear error, not silence.
    model = inject(tiny_bert(), CONFIG)
    allocator = RankAllocator(model, CONFIG)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    ids, labels = batch(0)
    F.cross_entropy(model(ids[rows]).logits, labels[rows]).backward()
    try:
        allocator.step()
        results["late_shard"] = None
    except RuntimeError as error:
        results["late_shard"] = str(error)

    # Crafted disagreements: rank 1 keeps triplet 4 of module b instead of 3, then is one step ahead.
    agreed = torch.tensor([True, False, True, True, False, True])
    scores = torch.tensor([3.0, 1.0, 2.0, 5.0, 0.5, 4.0])
    keep = agreed.clone()
    if rank == 1:
        keep[3], keep[4] = False, True
    errors = []
    for step, mask, score in ((7, keep, scores + 0.25 * rank), (7 + rank, agreed, scores)):
        try:
            check_allocation_consistency(step, 4, mask, score, ["a", "b"], [3, 3])
        except ConsistencyError as error:
            errors.append(str(error))
    results["crafted"] = errors

    # Two processes training without DDP on different rows: the replicas diverge and the check must catch it.
    try:
        train("plain", rows)
        results["undetected"] = None
    except ConsistencyError as error:
        results["undetected"] = str(error)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _spawn(worker, tmp: Path) -> float:
    """Run ``worker(rank, store, out)`` in WORLD fresh processes; return the seconds it took."""
    # Loopback only, one thread per process: the machine is shared.
    env = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo" if sys.platform == "linux" else "lo0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    start = time.perf_counter()
    try:
        mp.start_processes(worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, start_method="spawn")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("distributed")
    spawned = _spawn(_worker, tmp)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the single-process reference must run cleanly
        single = train("single", slice(None), check=False, save_to=tmp / "single-adapter")
        magnitude = train("single", slice(None), check=False, config=CONFIG.replace(importance="magnitude"))
    return {"ranks": ranks, "single": single, "single-magnitude": magnitude, "spawned": spawned, "dir": tmp}


# ---------------------------------------------------------------------- the tests
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-magnitude"])
def test_masks_agree_across_ranks_and_with_one_process(runs, mode):
    rank0, rank1 = (r[mode] for r in runs["ranks"])
    single = runs["single-magnitude" if mode.endswith("magnitude") else "single"]
    assert rank0["names"] == single["names"]  # DDP's "module." prefix is unwrapped
    assert rank0["history"] == rank1["history"] == single["history"]
    assert len(single["fingerprints"]) == 10  # allocations at t = 6, 8, ..., 24 (= T - t_f)
    assert rank0["fingerprints"] == rank1["fingerprints"] == single["fingerprints"]


@pytest.mark.slow
def test_each_way_of_training_gets_its_layout(runs):
    assert runs["single"]["layout"] == "Layout"
    for rank in runs["ranks"]:
        assert rank["ddp"]["layout"] == "ReplicatedLayout"
        assert rank["fsdp"]["layout"] == rank["fsdp-magnitude"]["layout"] == "ShardedLayout"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-magnitude"])
def test_trained_adapters_match_one_process(runs, mode):
    single = runs["single-magnitude" if mode.endswith("magnitude") else "single"]["tensors"]
    # The comparison means something only if the adapters moved well beyond the tolerance.
    assert max(float(t.abs().max()) for k, t in single.items() if k.endswith(".E")) > 1e-2
    for rank in runs["ranks"]:
        tensors = rank[mode]["tensors"]
        assert tensors.keys() == single.keys()
        for key, expected in single.items():
            torch.testing.assert_close(tensors[key], expected, atol=ATOL, rtol=RTOL, msg=f"{mode} {key}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_saved_adapter_matches_one_process(runs, mode):
    from safetensors.torch import load_file

    reference, saved = runs["dir"] / "single-adapter", runs["dir"] / f"{mode}-adapter"
    assert read_adapter_config(saved)["modules"] == read_adapter_config(reference)["modules"]  # ranks, names
    expected, actual = (
        load_file(reference / "adalora_adapter.safetensors"),
        load_file(saved / "adalora_adapter.safetensors"),
    )
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, atol=ATOL, rtol=RTOL, msg=f"{mode} {key}")


@pytest.mark.slow
def test_consistency_check_raises_on_every_rank(runs):
    for rank in runs["ranks"]:
        same_step, skewed = rank["crafted"]
        assert "2 triplet(s) are kept on some processes and masked on others, in b;" in same_step
        assert "differ by up to 0.25" in same_step
        assert "different steps" in skewed


@pytest.mark.slow
def test_training_without_ddp_is_caught(runs):
    messages = [rank["undetected"] for rank in runs["ranks"]]
    assert all(messages) and messages[0] == messages[1]
    assert "not wrapped in DistributedDataParallel" in messages[0]


@pytest.mark.slow
def test_allocator_built_before_fully_shard_is_an_error(runs):
    for rank in runs["ranks"]:
        assert "sharded with fully_shard after this allocator was built" in rank["late_shard"]


@pytest.mark.slow
def test_only_rank_zero_is_main(runs):
    assert [rank["main"] for rank in runs["ranks"]] == [True, False]


# ---------------------------------------------------------------------- single-process behaviour
def test_check_is_a_no_op_in_one_process(monkeypatch, tmp_path):
    """Without a process group, and in a group of one, there is nothing to compare: no collective, no error."""
    collectives = []
    monkeypatch.setattr(dist, "all_reduce", lambda *args, **kwargs: collectives.append(args))
    keep, scores = torch.tensor([True, False]), torch.tensor([1.0, 0.0])
    assert check_allocation_consistency(3, 1, keep, scores, ["a"], [2]) is None
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert check_allocation_consistency(3, 1, keep, scores, ["a"], [2]) is None
    finally:
        dist.destroy_process_group()
    assert collectives == []


def test_mask_fingerprint_sees_values_and_split():
    a = [torch.tensor([True, False]), torch.tensor([True])]
    assert mask_fingerprint(a) == mask_fingerprint([m.clone() for m in a])
    assert mask_fingerprint(a) != mask_fingerprint([torch.tensor([True, True]), torch.tensor([True])])
    assert mask_fingerprint(a) != mask_fingerprint([torch.tensor([True]), torch.tensor([False, True])])


def test_env_var_turns_the_check_on(monkeypatch):
    model = inject(tiny_bert(), CONFIG)
    assert not RankAllocator(model, CONFIG).check_consistency
    monkeypatch.setenv("ADALORA_CHECK_CONSISTENCY", "1")
    assert RankAllocator(model, CONFIG).check_consistency
    assert not RankAllocator(model, CONFIG, check_consistency=False).check_consistency


def test_a_new_layout_is_one_entry_in_the_table(monkeypatch):
    from adalora import parallel

    class Everywhere(parallel.Layout):
        supports_compaction = False

        @classmethod
        def applies(cls, model, optimizer, adapters):
            return True

    monkeypatch.setattr(parallel, "LAYOUTS", (Everywhere, *parallel.LAYOUTS))
    model = inject(tiny_bert(), CONFIG)
    allocator = RankAllocator(model, CONFIG)
    assert type(allocator.layout) is Everywhere and allocator.tracker.layout is allocator.layout
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match="compact_at_final=True is not supported"):
        RankAllocator(model, CONFIG.replace(compact_at_final=True), optimizer)


def test_unwrap_model_strips_wrappers():
    model = torch.nn.Linear(2, 2)
    assert unwrap_model(torch.nn.DataParallel(model)) is model
    assert unwrap_model(model) is model


# ---------------------------------------------------------------------- CUDA (skipped without a GPU)
def _cuda_worker(rank: int, store: str, out: str) -> None:
    """DDP on CUDA (nccl with 2 GPUs; gloo with both processes on one GPU), FSDP2 on CUDA over nccl.

    With one GPU, NCCL cannot put two ranks of one communicator on the same device, so FSDP2 runs on a
    one-process mesh per rank: no sharding, but the sharded-statistics code runs on CUDA tensors with nccl.
    """
    gpus = torch.cuda.device_count()
    device = torch.device("cuda", rank % gpus)
    torch.cuda.set_device(device)
    backend = "nccl" if gpus >= WORLD else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(60))
    half = GLOBAL_BATCH // WORLD
    rows = slice(rank * half, (rank + 1) * half)
    results: dict = {"backend": backend, "ddp": train("ddp", rows, device=device)}
    if gpus >= WORLD:
        results["fsdp"] = train("fsdp", rows, device=device)
    else:
        from torch.distributed.device_mesh import DeviceMesh

        singles = [dist.new_group([r], backend="nccl") for r in range(WORLD)]  # every rank creates every group
        mesh = DeviceMesh.from_group(singles[rank], "cuda")
        results["fsdp-1"] = train("fsdp", slice(None), device=device, mesh=mesh)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ddp_and_fsdp_match_one_process(tmp_path):
    _spawn(_cuda_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    single = train("single", slice(None), check=False, device=torch.device("cuda", 0))
    for rank in ranks:
        for mode in ("ddp", "fsdp", "fsdp-1"):
            if mode not in rank:
                continue
            assert rank[mode]["fingerprints"] == single["fingerprints"], f"{rank['backend']} {mode}"
            for key, expected in single["tensors"].items():
                torch.testing.assert_close(rank[mode]["tensors"][key], expected, atol=ATOL, rtol=RTOL, msg=key)


# ---------------------------------------------------------------------- the CLI and the Trainer under torchrun
@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """``adalora train`` and an AdaLoRATrainer run, once in this process and once under ``torchrun`` (2 processes).

    Both run from tests/distributed_script.py in one launch (starting processes is the slow part).
    """
    import distributed_script
    from cli_helpers import write_tiny_data, write_tiny_model

    from adalora.cli import main

    tmp = tmp_path_factory.mktemp("launched")
    model = write_tiny_model(tmp / "model")
    config = json.loads((model / "config.json").read_text())
    # Dropout draws different masks for a batch and for its halves: without it the runs must agree.
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    data = write_tiny_data(tmp / "data")
    threads = torch.get_num_threads()
    try:
        assert main(distributed_script.cli_args(model, data, tmp / "single" / "cli")) == 0
    finally:
        torch.set_num_threads(threads)
    torch.save(distributed_script.run_trainer(tmp / "single" / "trainer", world=1), tmp / "single" / "trainer.pt")

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo" if sys.platform == "linux" else "lo0",
        "ADALORA_CHECK_CONSISTENCY": "1",
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    script = Path(distributed_script.__file__)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD)]
    command += [str(script), str(tmp / "ddp"), str(model), str(data)]
    (tmp / "ddp").mkdir()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    (tmp / "ddp.log").write_text(done.stdout)
    (tmp / "ddp.err").write_text(done.stderr)
    assert json.loads((tmp / "ddp" / "world.json").read_text()) == WORLD
    return tmp


@pytest.mark.slow
def test_cli_under_torchrun_matches_one_process(launched):
    from safetensors.torch import load_file

    single, ddp = launched / "single" / "cli", launched / "ddp" / "cli"
    for name in ("rank_pattern.json", "allocation_history.json"):
        assert json.loads((ddp / name).read_text()) == json.loads((single / name).read_text()), name
    expected = load_file(single / "adapter" / "adalora_adapter.safetensors")
    actual = load_file(ddp / "adapter" / "adalora_adapter.safetensors")
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, atol=ATOL, rtol=RTOL, msg=key)
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (single, ddp)]
    for ours, reference in zip(metrics[1]["epochs"], metrics[0]["epochs"], strict=True):
        assert ours["eval_accuracy"] == reference["eval_accuracy"]
        assert ours["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)  # the global batch's loss


@pytest.mark.slow
def test_under_torchrun_rank_zero_alone_locks_and_a_held_directory_is_refused_everywhere(launched):
    """The script asserts exit status 2 on both ranks for the held directory (no rank waits for the other);
    the run's own lock is gone after it, and the refused run wrote nothing."""
    assert not (launched / "ddp" / "cli" / ".adalora-run.lock").exists()
    assert list((launched / "ddp").glob("held/*")) == []
    assert "is in use by adalora train" in (launched / "ddp.err").read_text()


@pytest.mark.slow
def test_cli_under_torchrun_reports_once(launched):
    log = (launched / "ddp.log").read_text()
    assert log.count("epoch 1/2:") == 1 and log.count("outputs in") == 1  # rank 0 alone reports
    assert "x 2 processes" in log
    assert "dropout is on" not in log  # the fixture's model has none


@pytest.mark.parametrize(("world", "dropout", "said"), [(2, 0.1, True), (2, 0.0, False), (1, 0.1, False)])
def test_cli_says_when_dropout_makes_processes_differ_from_one(monkeypatch, world, dropout, said):
    from types import SimpleNamespace

    from adalora.run import loop

    monkeypatch.setattr(loop.parallel, "get_world_size", lambda: world)
    settings = SimpleNamespace(
        method="adalora", task="trec", batch_size=8, grad_accum=1, precision="fp32", gradient_checkpointing=False,
        model=None, train_file=None,
    )  # fmt: skip
    data = SimpleNamespace(task=SimpleNamespace(name="classification", train=range(8), eval=range(8)))
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(dropout))
    model = SimpleNamespace(module=module, device="cpu")
    method = SimpleNamespace(total_steps=3, trainable_parameters=10)
    lines = loop.describe(settings, data, model, method)
    assert any("each process draws its own dropout masks" in line for line in lines) == said


@pytest.mark.slow
def test_trainer_under_torchrun_matches_one_process(launched):
    single = torch.load(launched / "single" / "trainer.pt", weights_only=False)
    ddp = torch.load(launched / "ddp" / "trainer.pt", weights_only=False)
    assert ddp["ranks"] == single["ranks"]
    assert ddp["state"].keys() == single["state"].keys()
    for key, value in single["state"].items():
        torch.testing.assert_close(ddp["state"][key], value, atol=ATOL, rtol=RTOL, msg=key)
    # One allocator file per checkpoint, written by rank 0 alone (identical state on every process).
    for step in (6, 12):
        files = sorted(p.name for p in (launched / "ddp" / "trainer" / f"checkpoint-{step}").glob("adalora_*"))
        assert files == ["adalora_allocator.pt"]
