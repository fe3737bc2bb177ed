"""Faults around checkpoints, ``--resume``, divergence and the adapter files, as a table.

Every case starts from a copy of a real run (interrupted after step 10 of 24, with checkpoints at steps 8 and 4;
or finished; or diverged), applies one fault and runs one command. A refusal must exit with status 2, print one
line on stderr without a traceback and leave every file as it was; a fault the run recovers from (a damaged
newest checkpoint: the previous one is used) must end with the files of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import random
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cli_helpers import tiny_train_args, write_tiny_data, write_tiny_model
from conftest import tiny_bert
from safetensors.torch import load_file, save_file

from adalora import AdaLoRAConfig, export_peft, find_adapters, inject, merge, save_adapter
from adalora.cli import main
from adalora.files.checkpoint import previous_checkpoint
from adalora.run import outputs
from adalora.run.directory import PREVIOUS_CHECKPOINT_FILE
from adalora.run.divergence import PATIENCE, track
from adalora.run.loop import RunCallbacks

pytestmark = pytest.mark.usefixtures("one_thread")

# 48 examples / batches of 4 = 12 steps per epoch, 24 in all; a checkpoint every 4 steps (and at step 12).
SETTINGS = ("--batch-size", "4", "--save-every", "4", "--dropout", "0.1")
STOP_AT = 10  # the interrupted runs stop after this step: checkpoint.pt is step 8, checkpoint.prev.pt step 4


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``adalora ARGV`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def interrupted(assets: tuple[Path, Path], out: Path, *extra: str) -> Path:
    """A run stopped (as by Ctrl-C) after optimizer step :data:`STOP_AT`."""
    original = RunCallbacks.on_step

    def on_step(self: RunCallbacks, result) -> None:
        original(self, result)
        if result.step == STOP_AT:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunCallbacks, "on_step", on_step)
        status, _, err = run_cli(tiny_train_args(*assets, out, *SETTINGS, *extra))
    assert status == 130 and "--resume" in err, err
    return out


@dataclass(frozen=True)
class Runs:
    root: Path
    model: Path
    data: Path

    def path(self, name: str) -> Path:
        return self.root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """The runs the faults start from: interrupted AdaLoRA (seed 0 and seed 1) and LoRA runs, a finished
    AdaLoRA run (the reference every recovered run must equal) and a diverged one (lr 1e30)."""
    threads = torch.get_num_threads()  # adalora train sets it for the process
    root = tmp_path_factory.mktemp("runs")
    assets = write_tiny_model(root / "model"), write_tiny_data(root / "data")
    interrupted(assets, root / "adalora")
    interrupted(assets, root / "seed1", "--seed", "1")
    interrupted(assets, root / "lora", "--method", "lora")
    assert run_cli(tiny_train_args(*assets, root / "complete", *SETTINGS))[0] == 0
    run_cli(tiny_train_args(*assets, root / "diverged", *SETTINGS, "--lr", "1e30"))
    torch.set_num_threads(threads)
    return Runs(root, *assets)


# ---------------------------------------------------------------------------------------------- faults
def flip_bytes(path: Path) -> None:
    """Set 16 bytes of the first tensor stored in a torch.save archive to 0xFF (a disk or copy fault)."""
    with zipfile.ZipFile(path) as archive:
        member = next(info for info in archive.infolist() if "/data/" in info.filename)
    with open(path, "r+b") as file:
        file.seek(member.header_offset + 26)
        name_length, extra_length = int.from_bytes(file.read(2), "little"), int.from_bytes(file.read(2), "little")
        file.seek(member.header_offset + 30 + name_length + extra_length)
        file.write(b"\xff" * 16)


def newest_bytes(run: Path, data: bytes, previous: bool = True) -> None:
    """checkpoint.pt holds ``data``; checkpoint.prev.pt is removed unless ``previous``."""
    (run / "checkpoint.pt").write_bytes(data)
    if not previous:
        (run / PREVIOUS_CHECKPOINT_FILE).unlink()


RANDOM = random.Random(0).randbytes(4096)


def set_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def checkpoint_of_version(path: Path, version: int) -> None:
    payload = torch.load(path, weights_only=True)
    torch.save(payload | {"format_version": version}, path)


def nan_adapter(adapter: Path) -> None:
    """An adapter with a NaN factor, as a diverged run wrote before they were refused (checksum updated)."""
    weights, config = adapter / "adalora_adapter.safetensors", adapter / "adalora_config.json"
    tensors = load_file(weights)
    first = sorted(name for name in tensors if name.endswith(".E"))[0]
    tensors[first] = torch.full_like(tensors[first], math.nan)
    save_file(tensors, weights, metadata={"format": "pt"})
    data = weights.read_bytes()
    record = {"name": weights.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    set_json(config, weights_file=record)


def nothing(run: Path, runs: Runs) -> None:
    return None


@dataclass(frozen=True)
class Fault:
    name: str
    source: str  # the run the case copies: adalora, lora, complete or diverged (see :func:`runs`)
    damage: Callable[[Path, Runs], None]  # applied to the copy
    argv: tuple[str, ...]  # {run} is the copy
    status: int  # 2: refused, nothing changed; 0: recovered, the result equals the uninterrupted run's
    message: str  # a phrase of the one stderr line (status 2) or of the output (status 0)


RESUME = ("train", "--resume", "{run}")
FAULTS = [
    # damaged checkpoints: the newest falls back to the previous one; both damaged are refused
    Fault(
        "newest-checkpoint-bytes-flipped", "adalora", lambda run, _: flip_bytes(run / "checkpoint.pt"), RESUME, 0,
        "checkpoint.pt is damaged: its contents fail their SHA-256 check (changed after it was written): resuming "
        "from the checkpoint before it, checkpoint.prev.pt",
    ),
    Fault(
        "newest-checkpoint-random-bytes", "adalora", lambda run, _: newest_bytes(run, RANDOM), RESUME, 0,
        "checkpoint.pt is damaged: it cannot be read as a checkpoint",
    ),
    Fault(
        "newest-checkpoint-missing", "adalora", lambda run, _: (run / "checkpoint.pt").unlink(), RESUME, 0,
        "checkpoint.pt is missing (the run stopped while writing it): resuming from the checkpoint before it",
    ),
    Fault(
        "both-checkpoints-bytes-flipped", "adalora",
        lambda run, _: (flip_bytes(run / "checkpoint.pt"), flip_bytes(run / PREVIOUS_CHECKPOINT_FILE)), RESUME, 2,
        "checkpoint.prev.pt is damaged: its contents fail their SHA-256 check (changed after it was written); start "
        "the run over with --overwrite",
    ),
    Fault(
        "checkpoint-random-bytes", "adalora", lambda run, _: newest_bytes(run, RANDOM, previous=False),
        RESUME, 2, "checkpoint.pt is damaged: it cannot be read as a checkpoint (",
    ),
    Fault(
        "checkpoint-truncated", "adalora",
        lambda run, _: newest_bytes(run, (run / "checkpoint.pt").read_bytes()[:5000], previous=False),
        RESUME, 2, "checkpoint.pt is damaged: it cannot be read as a checkpoint",
    ),
    Fault(
        "checkpoint-empty", "adalora",
        lambda run, _: newest_bytes(run, b"", previous=False),
        RESUME, 2, "checkpoint.pt is damaged: it cannot be read as a checkpoint",
    ),
    # sound checkpoints that are not this run's: refused, never replaced by an older one
    Fault(
        "checkpoint-of-another-run", "adalora",
        lambda run, runs: shutil.copy(runs.path("seed1") / "checkpoint.pt", run / "checkpoint.pt"), RESUME, 2,
        "checkpoint.pt belongs to another run (run id",
    ),
    Fault(
        "checkpoint-of-a-lora-run", "adalora",
        lambda run, runs: shutil.copy(runs.path("lora") / "checkpoint.pt", run / "checkpoint.pt"), RESUME, 2,
        "checkpoint.pt belongs to another run (run id",
    ),
    Fault(
        "checkpoint-of-another-method-same-run-id", "adalora",
        lambda run, runs: (
            shutil.copy(runs.path("lora") / "checkpoint.pt", run / "checkpoint.pt"),
            set_json(run / "run.json", run_id=json.loads((runs.path("lora") / "run.json").read_text())["run_id"]),
        ),
        RESUME, 2, "checkpoint.pt does not fit this model (another method, rank or target modules): 48 tensors have "
        "other shapes",
    ),
    Fault(
        "checkpoint-format-version-0", "adalora",
        lambda run, _: checkpoint_of_version(run / "checkpoint.pt", 0), RESUME, 2,
        "checkpoint.pt has checkpoint format version 0; this adalora reads version 1 only",
    ),
    Fault(
        "run-json-format-version-0", "adalora", lambda run, _: set_json(run / "run.json", format_version=0), RESUME, 2,
        "its run.json has format_version 0, this adalora reads version 1 only; start the run over with --overwrite",
    ),
    Fault(
        "marker-format-version-0", "adalora", lambda run, _: set_json(run / ".adalora-run", format_version=0),
        RESUME, 2, "its .adalora-run has format_version 0, this adalora reads version 1 only",
    ),
    # --resume with options: those typed must say what the run uses, whatever their default
    Fault(
        "resume-lora-run-with-method-adalora", "lora", nothing, (*RESUME, "--method", "adalora"), 2,
        "--method adalora differs from the run's lora; drop --method",
    ),
    Fault(
        "resume-adalora-run-with-method-lora", "adalora", nothing, (*RESUME, "--method", "lora"), 2,
        "--method lora differs from the run's adalora; drop --method",
    ),
    Fault(
        "resume-with-max-grad-norm-0", "adalora", nothing, (*RESUME, "--max-grad-norm", "0"), 2,
        "--max-grad-norm 0 differs from the run's 1.0; drop --max-grad-norm",
    ),
    Fault(
        "resume-with-output-dir", "adalora", nothing, (*RESUME, "--output-dir", "{run}"), 2,
        "--resume continues a run in its own directory; drop --output-dir/--overwrite",
    ),
    Fault(
        "resume-with-its-own-settings-and-threads", "adalora", nothing,
        (*RESUME, "--method", "adalora", "--epochs", "2", "--seed", "0", "--threads", "1"), 0, "resuming",
    ),
    # a diverged run: failed, not resumed
    Fault("resume-a-diverged-run", "diverged", nothing, RESUME, 2, "it failed: training diverged: the loss was NaN"),
    Fault("export-a-diverged-run", "diverged", nothing, ("export", "{run}"), 2, "has no adapter: it failed: training"),
    Fault(
        "merge-a-diverged-run", "diverged", nothing, ("merge", "{run}", "--out", "{run}/merged"), 2,
        "has no adapter: it failed: training diverged",
    ),
    # adapter files: another format version, or NaN (written before non-finite adapters were refused)
    Fault(
        "adapter-format-version-0", "complete",
        lambda run, _: set_json(run / "adapter" / "adalora_config.json", format_version=0), ("export", "{run}"), 2,
        "has format_version 0; this adalora",
    ),
    *(
        Fault(
            f"export-{format}-of-a-nan-adapter", "complete", lambda run, _: nan_adapter(run / "adapter"),
            ("export", "{run}", "--format", format), 2, "holds NaN or inf (1 of 38 tensors, e.g. 'bert.encoder.layer.0",
        )
        for format in ("peft", "gguf", "rank-pattern")
    ),
    Fault(
        "merge-a-nan-adapter", "complete", lambda run, _: nan_adapter(run / "adapter"),
        ("merge", "{run}", "--out", "{run}/merged"), 2, "holds NaN or inf (1 of 38 tensors, e.g. 'bert.encoder.layer.0",
    ),
]  # fmt: skip


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: "dir", or the SHA-256 of the file."""
    return {
        str(path.relative_to(root)): "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
    }


def assert_same_files(out: Path, reference: Path) -> None:
    """``out`` holds the files of ``reference`` with the same content: JSON equal but for the run id and timings,
    tensors equal to float rounding, figures byte for byte."""
    files = sorted(str(p.relative_to(reference)) for p in reference.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == files
    for name in files:
        mine, theirs = out / name, reference / name
        if name.endswith(".safetensors"):
            got, expected = load_file(mine), load_file(theirs)
            assert got.keys() == expected.keys()
            for key in expected:
                torch.testing.assert_close(got[key], expected[key], msg=key)
        elif name.endswith(".json") or name == ".adalora-run":
            assert_close_json(
                comparable(json.loads(mine.read_text())), comparable(json.loads(theirs.read_text())), name
            )
        else:
            assert mine.read_bytes() == theirs.read_bytes(), name


def assert_close_json(mine: object, theirs: object, where: str) -> None:
    """Equal JSON values, floats to 1e-5 relative (losses summed in another order after a resume)."""
    if isinstance(theirs, float) and isinstance(mine, float):
        assert mine == pytest.approx(theirs, rel=1e-5, nan_ok=True), where
    elif isinstance(theirs, dict) and isinstance(mine, dict):
        assert mine.keys() == theirs.keys(), where
        for key in theirs:
            assert_close_json(mine[key], theirs[key], f"{where}: {key}")
    elif isinstance(theirs, list) and isinstance(mine, list):
        assert len(mine) == len(theirs), where
        for index, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            assert_close_json(a, b, f"{where}[{index}]")
    else:
        assert mine == theirs, where


def comparable(value: object) -> object:
    """A run's JSON without what differs between two runs of the same settings: run id, times, checksums."""
    if isinstance(value, dict):
        skip = {"run_id", "seconds", "train_seconds", "sha256", "bytes"}
        return {key: comparable(item) for key, item in value.items() if key not in skip}
    if isinstance(value, list):
        return [comparable(item) for item in value]
    return value


@pytest.mark.parametrize("fault", FAULTS, ids=[fault.name for fault in FAULTS])
def test_fault(fault: Fault, runs: Runs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs.path(fault.source), run)
    fault.damage(run, runs)
    before = snapshot(tmp_path), snapshot(runs.root)
    status, out, err = run_cli([arg.format(run=run) for arg in fault.argv])
    assert status == fault.status, err
    if fault.status == 0:
        assert fault.message in out, out
        assert_same_files(run, runs.path("complete"))
        return
    assert err.count("\n") == 1 and err.startswith("adalora: error: "), err
    assert "Traceback" not in err and "weights_only=False" not in err
    assert fault.message in err, err
    assert (snapshot(tmp_path), snapshot(runs.root)) == before  # nothing changed, the other runs neither


# ---------------------------------------------------------------------------------------------- divergence
def test_a_diverging_run_stops_in_one_line_marked_failed_without_an_adapter(runs: Runs, tmp_path: Path) -> None:
    out = tmp_path / "run"
    status, stdout, err = run_cli(tiny_train_args(runs.model, runs.data, out, *SETTINGS, "--lr", "1e30"))
    assert status == 2
    assert err.count("\n") == 1 and "Traceback" not in err and ".py:" not in stdout + err  # no Python warnings
    assert err.startswith("adalora: error: training diverged: the loss was NaN or inf for 3 optimizer steps in a row")
    assert "at learning rate 1e+30" in err and "--overwrite and a lower --lr (e.g. 1e+29)" in err
    failure = json.loads((out / "run.json").read_text())["failure"]
    assert failure["reason"] == "diverged" and failure["lr"] == 1e30 and failure["message"] in err
    assert sorted(p.name for p in out.iterdir()) == [".adalora-run", "run.json"]  # no adapter, metrics, checkpoint
    status, stdout, _ = run_cli(["inspect", str(out)])
    assert status == 0 and "status: failed: training diverged" in stdout


def test_divergence_takes_patience_non_finite_losses_in_a_row() -> None:
    """A transient non-finite loss (an fp16 step the GradScaler skipped) is tolerated; PATIENCE in a row is not."""
    assert PATIENCE == 3
    state: dict = {"nonfinite_since": None}
    losses = [0.7, math.nan, 0.69, math.inf, math.nan, 0.68, math.nan, math.nan, math.nan]
    stopped = [step for step, loss in enumerate(losses, start=1) if track(state, step, loss)]
    assert stopped == [9] and state["nonfinite_since"] == 7


def test_fp16_steps_skipped_by_the_grad_scaler_do_not_count(runs: Runs, tmp_path: Path) -> None:
    """fp16 on the CPU with a loss scale so large that the first gradients overflow: the GradScaler skips those
    steps (their loss is finite) and the run completes."""
    scales = []
    original = torch.amp.GradScaler.__init__

    def huge_scale(self, *args, **kwargs) -> None:
        original(self, *args, **{**kwargs, "init_scale": 2.0**60})
        scales.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.amp.GradScaler, "__init__", huge_scale)
        status, _, err = run_cli(tiny_train_args(runs.model, runs.data, tmp_path / "run", "--precision", "fp16"))
    assert status == 0, err
    assert scales and scales[0].get_scale() < 2.0**60 / 2**PATIENCE  # more than PATIENCE steps were skipped
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["completed"]


def test_the_library_refuses_to_save_export_or_merge_a_nan_adapter(tmp_path: Path) -> None:
    config = AdaLoRAConfig(target_modules=["query", "value"], init_r=4, target_r=2)
    model = inject(tiny_bert(), config)
    name, adapter = find_adapters(model)[0]
    with torch.no_grad():
        adapter.E[1] = math.nan
    message = rf"holds NaN or inf \(1 of \d+ tensors, e.g. '{name}.E'\): its training diverged"
    for write in (
        lambda: save_adapter(model, tmp_path / "adapter", config),
        lambda: export_peft(model, tmp_path / "peft", config),
        lambda: merge(model),
    ):
        with pytest.raises(ValueError, match=message):
            write()
    assert not list(tmp_path.iterdir()) and find_adapters(model)


# ---------------------------------------------------------------------------------------------- resumed = uninterrupted
def test_a_run_resumed_after_its_last_step_writes_the_files_of_an_uninterrupted_one(runs: Runs, tmp_path) -> None:
    """Interrupted while saving its outputs (after the last checkpoint): the resumed run trains no step and runs
    no forward pass, and still writes what the uninterrupted run wrote (the adapter's recorded base config too)."""
    out = tmp_path / "run"

    def interrupted_save(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(outputs, "save_weights", interrupted_save)
        assert run_cli(tiny_train_args(runs.model, runs.data, out, *SETTINGS))[0] == 130
    status, stdout, err = run_cli(["train", "--resume", str(out)])
    assert status == 0, err
    assert "at step 24/24" in stdout
    assert_same_files(out, runs.path("complete"))


def test_previous_checkpoint_name() -> None:
    assert previous_checkpoint(Path("run/checkpoint.pt")) == Path("run") / PREVIOUS_CHECKPOINT_FILE
