"""The fault table: what adalora does when a run is signalled or killed, raced by another command on the same
directory, or runs out of disk (docs/cli.md, "Faults").

Every row of :data:`FAULTS` is one fault: how to provoke it, the exit status, the one line on stderr (a regular
expression; no traceback; nothing at all after SIGKILL), and what must hold afterwards:

- :func:`resumes`: ``adalora train --resume`` ends with the uninterrupted run's result, bit for bit (adapter,
  rank pattern, allocation history, per-epoch metrics), and leaves no temporary file or lock behind;
- :func:`reruns`: the same ``adalora train`` command, run again, does;
- :func:`unchanged`: every file that was there before the fault (hashed before and after) is as it was.

Adding a fault is one line in :data:`FAULTS`, with a provocation (a function of the :class:`Case`, returning
the :class:`Outcome`) and one of the checks above or another ``(case, outcome) -> None``.

Runs: the tiny BERT and files of cli_helpers, batches of 4 (24 optimizer steps), a checkpoint every 4 steps
(and at each epoch's end, step 12): step 10 is between two checkpoints. Signals and SIGKILL hit a child
process (tests/run/test_resume.py's way: the child signals itself at a chosen point); a second command racing a
run runs while that run is paused, holding its directory; full disks are a real tmpfs, filled at a chosen
point (it needs root to mount: skipped with the reason otherwise).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from cli_helpers import tiny_train_args, write_tiny_data, write_tiny_model
from safetensors.torch import load_file

from adalora.cli import main

pytestmark = [
    pytest.mark.skipif(not hasattr(signal, "SIGKILL") or sys.platform != "linux", reason="needs Linux signals"),
    pytest.mark.usefixtures("one_thread"),
]

SETTINGS = ("--batch-size", "4", "--save-every", "4", "--dropout", "0.1")
LOCK = ".adalora-run.lock"

# A child process running the CLI that signals itself (or pauses) at a point: "step N" (after allocator step N),
# "save" (the final adapter's weights are written, the directory not yet swapped in), "pause N DIR" (after step
# N: writes DIR/paused, then waits for DIR/go, holding its run directory meanwhile), or "none".
CHILD = """
import os, signal, sys, time
for name in ("SIGTERM", "SIGHUP"):  # as in a terminal session, whatever the test runner ignores
    signal.signal(getattr(signal, name), signal.SIG_DFL)
signal.signal(signal.SIGINT, signal.default_int_handler)
what, point = sys.argv[1], sys.argv[2].split()
if point[0] == "none":
    pass
elif point[0] == "save":
    import adalora.files.adapter as adapter
    original_save = adapter.save_file
    def save_file(*args, **kwargs):
        original_save(*args, **kwargs)
        os.kill(os.getpid(), getattr(signal, what))
    adapter.save_file = save_file
else:
    from adalora.allocator import RankAllocator
    original_step = RankAllocator.step
    def step(self):
        report = original_step(self)
        if self.step_count == int(point[1]):
            if point[0] == "pause":
                open(os.path.join(point[2], "paused"), "w").close()
                while not os.path.exists(os.path.join(point[2], "go")):
                    time.sleep(0.05)
            else:
                os.kill(os.getpid(), getattr(signal, what))
        return report
    RankAllocator.step = step
from adalora.cli import main
sys.exit(main(sys.argv[3:]))
"""


@dataclass
class Outcome:
    """What a provoked fault did: the command's exit status and stderr, and a digest of the files that were
    there before it (for :func:`unchanged`; None when the fault is meant to write, like a checkpoint)."""

    status: int
    stderr: str
    before: dict[str, str] | None = None
    watched: list[Path] = field(default_factory=list)


@dataclass
class Case:
    """What a row works with: the tiny model and data, the uninterrupted run, a directory of its own."""

    model: Path
    data: Path
    reference: Path
    root: Path
    request: pytest.FixtureRequest

    @property
    def run(self) -> Path:
        return self.root / "run"

    def train_args(self, out: Path | None = None) -> list[str]:
        return tiny_train_args(self.model, self.data, out or self.run, *SETTINGS)


# ---------------------------------------------------------------------------------------------- helpers
def digest(paths: list[Path]) -> dict[str, str]:
    """SHA-256 of every file under ``paths`` (hidden ones too), by path; "absent" for a path that is not there."""
    found = {}
    for path in paths:
        if not path.exists():
            found[str(path)] = "absent"
            continue
        for file in sorted(p for p in [path, *path.rglob("*")] if p.is_file()):
            found[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return found


def child(case: Case, what: str, point: str, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-c", CHILD, what, point, *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Outcome:
    capsys.readouterr()
    status = main(argv)
    return Outcome(status, capsys.readouterr().err)


def assert_uninterrupted_result(out: Path, reference: Path) -> None:
    """``out`` holds exactly what the uninterrupted run wrote, and nothing left over from a fault."""
    read = lambda path: json.loads(path.read_text())  # noqa: E731
    for name in ("rank_pattern.json", "allocation_history.json"):
        assert read(out / name) == read(reference / name), name
    got = load_file(out / "adapter" / "adalora_adapter.safetensors")
    expected = load_file(reference / "adapter" / "adalora_adapter.safetensors")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key  # bit for bit: the same steps on the same thread
    config = "adapter/adalora_config.json"
    assert read(out / config) == read(reference / config)  # the same tensors, and the same model config
    epochs = zip(read(out / "metrics.json")["epochs"], read(reference / "metrics.json")["epochs"], strict=True)
    for mine, theirs in epochs:
        assert mine["eval_accuracy"] == theirs["eval_accuracy"] and mine["train_loss"] == theirs["train_loss"]
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".adalora-run"]
    assert leftovers == [] and not (out / "checkpoint.pt").exists(), leftovers
    assert not [p for p in out.rglob("*") if p.is_file() and p.stat().st_size == 0]


# ---------------------------------------------------------------------------------------------- checks afterwards
def resumes(case: Case, outcome: Outcome) -> None:
    capsys = case.request.getfixturevalue("capsys")
    capsys.readouterr()
    assert main(["train", "--resume", str(case.run)]) == 0, capsys.readouterr().err
    assert_uninterrupted_result(case.run, case.reference)


def reruns(case: Case, outcome: Outcome) -> None:
    capsys = case.request.getfixturevalue("capsys")
    capsys.readouterr()
    assert main(case.train_args()) == 0, capsys.readouterr().err
    assert_uninterrupted_result(case.run, case.reference)


def unchanged(case: Case, outcome: Outcome) -> None:
    assert outcome.before is not None
    assert digest(outcome.watched) == outcome.before


# ---------------------------------------------------------------------------------------------- signals
def signalled(name: str, point: str) -> Callable[[Case], Outcome]:
    """``adalora train`` in a child process that gets signal ``name`` at ``point`` (see :data:`CHILD`)."""

    def provoke(case: Case) -> Outcome:
        process = child(case, name, point, case.train_args())
        _, stderr = process.communicate(timeout=300)
        if name == "SIGKILL":  # no handler runs: its lock and the temporary files of the save stay behind
            assert (case.run / LOCK).exists()
            if point == "save":
                assert list(case.run.glob(".adapter.tmp-*"))
        else:
            assert not (case.run / LOCK).exists() and not list(case.run.glob(".adapter.tmp-*"))
        return Outcome(process.returncode, stderr)

    return provoke


# ---------------------------------------------------------------------------------------------- a second command
@pytest.fixture(scope="module")
def holder(assets, tmp_path_factory) -> Iterator[Path]:
    """A run paused at step 10, holding its directory; the module's other rows race it. Resumed at the end,
    it must finish as the uninterrupted run."""
    model, data, reference = assets
    root = tmp_path_factory.mktemp("holder")
    case = Case(model, data, reference, root, None)  # type: ignore[arg-type]
    process = child(case, "-", f"pause 10 {root}", case.train_args())
    deadline = time.monotonic() + 300
    while not (root / "paused").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
        time.sleep(0.1)
    yield case.run
    (root / "go").touch()
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    assert_uninterrupted_result(case.run, reference)


def while_training(*argv: str) -> Callable[[Case], Outcome]:
    """A command run while :func:`holder` holds its directory: ``TRAIN`` stands for the tiny ``adalora train``
    into that directory; ``{held}`` is that directory, ``{reference}`` the finished run, ``{root}`` the row's
    own directory."""

    def provoke(case: Case) -> Outcome:
        held = case.request.getfixturevalue("holder")
        args = [a.format(held=held, reference=case.reference, root=case.root) for a in argv]
        if args[0] == "TRAIN":
            args = [*case.train_args(held), *args[1:]]
        watched = [held, case.reference, case.root]
        before = digest(watched)
        outcome = in_process(args, case.request.getfixturevalue("capsys"))
        return Outcome(outcome.status, outcome.stderr, before, watched)

    return provoke


def started_together(case: Case) -> Outcome:
    """Two identical ``adalora train`` started at once into one new directory: one runs, the other is refused."""
    first, second = (child(case, "-", "none", case.train_args()) for _ in range(2))
    done = [(p.wait(timeout=300), p.communicate()[1]) for p in (first, second)]
    assert sorted(status for status, _ in done) == [0, 2], done
    return next(Outcome(status, stderr) for status, stderr in done if status == 2)


def winner_matches(case: Case, outcome: Outcome) -> None:
    assert_uninterrupted_result(case.run, case.reference)


# ---------------------------------------------------------------------------------------------- full disks
@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> Iterator[Path]:
    """A real 16 MB tmpfs (the tests fill it when they want the disk full)."""
    path = tmp_path_factory.mktemp("disk")
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("full-disk faults mount a tmpfs: that needs root (run the tests as root to cover them)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"full-disk faults mount a tmpfs, refused here: {mounted.stderr.decode().strip()}")
    yield path
    subprocess.run(["umount", str(path)], check=False)


def fill(disk: Path) -> None:
    """Write to ``disk`` until the file system says it is full."""
    with open(disk / "filler", "ab", buffering=0) as filler:  # unbuffered: nothing left to flush on close
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    filler.write(b"\0" * size)
            except OSError:
                continue


def full_disk(point: str) -> Callable[[Case], Outcome]:
    """``adalora train`` on a tmpfs that fills up at ``point``: "run.json" (just before it is written: the run
    has only its marker), "checkpoint" (after step 10: the checkpoint of step 12 cannot be written), "adapter"
    (the final adapter), "figure" (the first figure). The disk is freed afterwards."""

    def provoke(case: Case) -> Outcome:
        import adalora.files.adapter
        import adalora.run.outputs
        import adalora.run.start
        from adalora.allocator import RankAllocator

        disk = case.request.getfixturevalue("disk")
        monkeypatch = case.request.getfixturevalue("monkeypatch")
        case.root = disk / case.root.name  # the row's run goes on the disk
        case.root.mkdir()

        def filling(module: object, name: str) -> None:
            original = getattr(module, name)

            def fill_first(*args, **kwargs):
                if point != "run.json" or Path(args[0]).name == "run.json":
                    fill(disk)
                return original(*args, **kwargs)

            monkeypatch.setattr(module, name, fill_first)

        if point == "run.json":
            filling(adalora.run.start, "write_json")
        elif point == "adapter":
            filling(adalora.files.adapter, "save_file")
        elif point == "figure":
            filling(adalora.run.outputs, "draw_figures")
        else:
            original = RankAllocator.step

            def step(self):
                report = original(self)
                if self.step_count == 10:
                    fill(disk)
                return report

            monkeypatch.setattr(RankAllocator, "step", step)
        try:
            outcome = in_process(case.train_args(), case.request.getfixturevalue("capsys"))
        finally:
            monkeypatch.undo()
            (disk / "filler").unlink(missing_ok=True)
        assert not [p for p in case.run.rglob("*") if p.is_file() and p.stat().st_size == 0]  # no empty PNG
        assert not [p.name for p in case.run.iterdir() if ".tmp" in p.name]
        return outcome

    return provoke


def full_disk_out(command: str) -> Callable[[Case], Outcome]:
    """``adalora export``/``merge`` of the finished run to ``--out {disk}/out`` on a full tmpfs."""

    def provoke(case: Case) -> Outcome:
        disk = case.request.getfixturevalue("disk")
        args = [command, str(case.reference), "--out", str(disk / "out")]
        watched = [case.reference, disk / "out"]
        before = digest(watched)
        fill(disk)
        try:
            outcome = in_process(args, case.request.getfixturevalue("capsys"))
        finally:
            (disk / "filler").unlink()
        assert not (disk / "out").exists() and not list(disk.glob(".out*"))  # nor a temporary file or directory
        return Outcome(outcome.status, outcome.stderr, before, watched)

    return provoke


# ---------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Fault:
    name: str
    provoke: Callable[[Case], Outcome]
    status: int  # the exit status (negative: killed by that signal)
    line: str | None  # the one stderr line, a regular expression ({run}: the run directory); None: no output
    then: Callable[[Case, Outcome], None]


def stopped(name: str, at: int | None = None) -> str:
    where = "" if at is None else rf" at step {at}/24 \(checkpoint saved\)"
    return rf"adalora: stopped by {name}{where}; continue with: adalora train --resume {{run}}"


def no_space(path: str, then: str = "") -> str:
    return rf"adalora: error: cannot write {path}: No space left on device{then}"


IN_USE = r"adalora: error: {held} is in use by adalora train \(pid \d+\); wait for it to finish"
OTHER_DIR = ", or choose another --output-dir"
RESUME = "; once that is fixed, continue with: adalora train --resume {run}"
RERUN = "; once that is fixed, run the same command again"
TOGETHER = r"adalora: error: {run} (is in use by adalora train \(pid \d+\)|already holds a run).*"

FAULTS = [
    Fault("SIGTERM-training", signalled("SIGTERM", "step 10"), 143, stopped("SIGTERM", at=10), resumes),
    Fault("SIGHUP-training", signalled("SIGHUP", "step 10"), 129, stopped("SIGHUP", at=10), resumes),
    Fault("SIGINT-training", signalled("SIGINT", "step 10"), 130, stopped("SIGINT", at=10), resumes),
    Fault("SIGKILL-training", signalled("SIGKILL", "step 10"), -signal.SIGKILL, None, resumes),
    Fault("SIGTERM-final-save", signalled("SIGTERM", "save"), 143, stopped("SIGTERM"), resumes),
    Fault("SIGHUP-final-save", signalled("SIGHUP", "save"), 129, stopped("SIGHUP"), resumes),
    Fault("SIGINT-final-save", signalled("SIGINT", "save"), 130, stopped("SIGINT"), resumes),
    Fault("SIGKILL-final-save", signalled("SIGKILL", "save"), -signal.SIGKILL, None, resumes),
    Fault("train-train-together", started_together, 2, TOGETHER, winner_matches),
    Fault("train-while-training", while_training("TRAIN"), 2, IN_USE + OTHER_DIR, unchanged),
    Fault("overwrite-while-training", while_training("TRAIN", "--overwrite"), 2, IN_USE + OTHER_DIR, unchanged),
    Fault("resume-while-training", while_training("train", "--resume", "{held}"), 2, IN_USE, unchanged),
    Fault("export-while-training", while_training("export", "{held}"), 2, IN_USE, unchanged),
    Fault("export-into-training", while_training("export", "{reference}", "--out", "{held}/x"), 2, IN_USE, unchanged),
    Fault("merge-while-training", while_training("merge", "{held}", "--out", "{root}/merged"), 2, IN_USE, unchanged),
    Fault("plot-while-training", while_training("plot", "{held}"), 2, IN_USE, unchanged),
    Fault("full-disk-run.json", full_disk("run.json"), 2, no_space("{run}/run.json", RERUN), reruns),
    Fault("full-disk-checkpoint", full_disk("checkpoint"), 2, no_space("{run}/checkpoint.pt", RESUME), resumes),
    Fault("full-disk-adapter", full_disk("adapter"), 2, no_space("{run}/adapter", RESUME), resumes),
    Fault("full-disk-figure", full_disk("figure"), 2, no_space("{run}/rank_heatmap.png", RESUME), resumes),
    Fault("full-disk-export", full_disk_out("export"), 2, no_space("{disk}/out"), unchanged),
    Fault("full-disk-merge", full_disk_out("merge"), 2, no_space("{disk}/out"), unchanged),
]  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The tiny model, its data, and the uninterrupted run every fault is compared with."""
    root = tmp_path_factory.mktemp("assets")
    model, data = write_tiny_model(root / "model"), write_tiny_data(root / "data")
    reference = root / "reference"
    threads = torch.get_num_threads()
    try:
        assert main(tiny_train_args(model, data, reference, *SETTINGS)) == 0
    finally:
        torch.set_num_threads(threads)
    return model, data, reference


# Tens of seconds each: a child process trained to a signal and resumed, two trainings at once, the first holder.
SLOW = {fault.name for fault in FAULTS if fault.name.startswith("SIG")} | {
    "train-train-together",
    "train-while-training",
}


@pytest.mark.parametrize(
    "fault", [pytest.param(f, id=f.name, marks=[pytest.mark.slow] if f.name in SLOW else []) for f in FAULTS]
)
def test_fault(fault: Fault, assets, tmp_path, request) -> None:
    case = Case(*assets, tmp_path, request)
    outcome = fault.provoke(case)
    assert outcome.status == fault.status, outcome.stderr[-3000:]
    if fault.line is None:
        assert outcome.stderr == ""
    else:
        assert outcome.stderr.count("\n") == 1 and "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
        held = request.getfixturevalue("holder") if "{held}" in fault.line else ""
        disk = request.getfixturevalue("disk") if "{disk}" in fault.line else ""
        values = {"run": case.run, "held": held, "disk": disk}
        expected = re.sub(r"\{(run|held|disk)\}", lambda m: re.escape(str(values[m.group(1)])), fault.line)
        assert re.fullmatch(expected, outcome.stderr.strip()), outcome.stderr
    fault.then(case, outcome)


@pytest.mark.slow
def test_inspect_says_a_run_is_in_progress(holder, capsys) -> None:
    assert main(["inspect", str(holder)]) == 0
    assert re.search(r"^status: in progress \(adalora train \(pid \d+\)\)$", capsys.readouterr().out, re.MULTILINE)
