"""What the crash-safety tests share: the settings of the tiny run they kill, the child program that SIGKILLs
itself mid-run, and the check that a resumed run ended exactly as the uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# 48 examples / batches of 4 = 12 steps per epoch, 24 in all: warm-up 5 steps, budgeting up to step 17, final 7.
# Checkpoints every 4 steps (and after each epoch's evaluation, at step 12).
SETTINGS = ("--batch-size", "4", "--save-every", "4", "--dropout", "0.1")

# Runs the CLI in a child process that SIGKILLs itself: after allocator step N ("step N"), or while writing its
# N-th checkpoint, half-way through the file ("save N").
KILLER = """
import os, signal, sys
import torch
mode, at = sys.argv[1], int(sys.argv[2])
if mode == "step":
    from adalora.allocator import RankAllocator
    original_step = RankAllocator.step
    def step(self):
        report = original_step(self)
        if self.step_count == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return report
    RankAllocator.step = step
else:
    original_save, calls = torch.save, [0]
    def save(obj, file, *args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            file.write(b"half a checkpoint")
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original_save(obj, file, *args, **kwargs)
    torch.save = save
from adalora.cli import main
sys.exit(main(sys.argv[3:]))
"""


def assert_same_run(out: Path, reference: Path) -> None:
    read = lambda path: json.loads(path.read_text())  # noqa: E731
    assert read(out / "rank_pattern.json") == read(reference / "rank_pattern.json")
    assert read(out / "allocation_history.json") == read(reference / "allocation_history.json")
    got = load_file(out / "adapter" / "adalora_adapter.safetensors")
    expected = load_file(reference / "adapter" / "adalora_adapter.safetensors")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value)
    metrics, reference_metrics = read(out / "metrics.json"), read(reference / "metrics.json")
    for mine, theirs in zip(metrics["epochs"], reference_metrics["epochs"], strict=True):
        assert mine["eval_accuracy"] == theirs["eval_accuracy"]
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
