"""Crash safety of ``adalora train``: a run killed with SIGKILL (mid budgeting phase, or in the middle of writing
a checkpoint) and resumed with ``--resume`` ends exactly as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import tiny_train_args, write_tiny_data, write_tiny_model
from resume_helpers import KILLER, SETTINGS, assert_same_run

from adalora.cli import main
from adalora.files.atomic import atomic_write
from adalora.files.checkpoint import rng_state, set_rng_state

pytestmark = [
    pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("assets")
    return write_tiny_model(root / "model"), write_tiny_data(root / "data")


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(tiny_train_args(*assets, out, *SETTINGS)) == 0
    return out


def killed_then_resumed(assets, out: Path, mode: str, at: int, capsys) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, "-c", KILLER, mode, str(at), *tiny_train_args(*assets, out, *SETTINGS)]
    child = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    # A checkpoint is left: the newest, or (killed while writing one) the one before it
    assert (out / "checkpoint.pt").is_file() or (out / "checkpoint.prev.pt").is_file()
    assert not (out / "metrics.json").exists()
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "status: incomplete (stopped at step" in capsys.readouterr().out
    assert main(["train", "--resume", str(out)]) == 0
    assert not list(out.glob(".*.tmp"))  # the torn temporary file of a killed write is cleaned up
    return capsys.readouterr().out


@pytest.mark.slow
def test_sigkill_mid_budgeting_then_resume_matches_an_uninterrupted_run(assets, uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    log = killed_then_resumed(assets, out, "step", 10, capsys)  # killed at step 10; the last checkpoint is step 8
    assert "at step 8/24" in log
    assert_same_run(out, uninterrupted)


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(assets, uninterrupted, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    log = killed_then_resumed(assets, out, "save", 4, capsys)  # dies writing the step-16 checkpoint
    assert "checkpoint.pt is missing (the run stopped while writing it): resuming from the checkpoint before it" in log
    assert "at step 12/24" in log
    assert_same_run(out, uninterrupted)


@pytest.mark.slow
def test_resume_before_the_first_checkpoint_starts_over(assets, uninterrupted, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, "-c", KILLER, "step", "2", *tiny_train_args(*assets, out, *SETTINGS)]
    assert subprocess.run(args, env=env, capture_output=True, timeout=300).returncode == -signal.SIGKILL
    assert main(["train", "--resume", str(out)]) == 0
    assert "starting again from step 0" in capsys.readouterr().out
    assert_same_run(out, uninterrupted)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path) -> None:
    path = tmp_path / "state.bin"
    atomic_write(path, lambda file: file.write(b"old"))

    def fail(file) -> None:
        file.write(b"new but incomplete")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_rng_state_round_trip() -> None:
    state = rng_state()
    first = torch.rand(3)
    set_rng_state(state)
    torch.testing.assert_close(torch.rand(3), first)
