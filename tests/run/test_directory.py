"""Output directories of ``adalora train``: recognised as ours by the marker file (or an older run's run.json),
--overwrite removes only what a run wrote, and what the run writes follows the umask."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
from cli_helpers import tiny_train_args, write_tiny_data, write_tiny_model

from adalora.cli import main
from adalora.files.atomic import WriteError, atomic_directory, atomic_write
from adalora.run.directory import MARKER_FILE, check_new_run, is_run_dir, is_unstarted

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("assets")
    return write_tiny_model(root / "model"), write_tiny_data(root / "data")


def lora_run(assets, out: Path, *extra: str) -> int:
    return main(tiny_train_args(*assets, out, "--method", "lora", "--epochs", "1", *extra))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_overwrite_removes_the_runs_files_and_nothing_else(assets, tmp_path, umask_027) -> None:
    out = tmp_path / "run"
    assert lora_run(assets, out) == 0
    assert json.loads((out / MARKER_FILE).read_text())["format"] == "adalora-run"
    (out / "my-notes.md").write_text("mine\n")
    (out / "mine").mkdir()
    (out / "mine" / "plot.png").write_bytes(b"mine")
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"torn")  # left by a killed write of ours
    old_run = (out / "run.json").read_text()
    assert lora_run(assets, out, "--overwrite", "--seed", "1") == 0
    assert (out / "my-notes.md").read_text() == "mine\n" and (out / "mine" / "plot.png").read_bytes() == b"mine"
    assert not (out / ".checkpoint.pt.abc123.tmp").exists()
    assert (out / "run.json").read_text() != old_run and json.loads((out / "run.json").read_text())["settings"][
        "seed"
    ] == 1
    # Everything the run wrote follows the umask (027: group may read, others nothing), the adapter included.
    for path in [out, *out.rglob("*")]:
        if path.name in ("my-notes.md", "mine", "plot.png"):
            continue
        assert mode(path) == (0o750 if path.is_dir() else 0o640), path


def test_a_run_written_before_the_marker_is_still_recognised(assets, tmp_path, capsys) -> None:
    out = tmp_path / "old"
    assert lora_run(assets, out) == 0
    (out / MARKER_FILE).unlink()  # as written by an earlier version
    assert is_run_dir(out)
    assert main(["inspect", str(out)]) == 0 and "final eval accuracy" in capsys.readouterr().out
    assert lora_run(assets, out) == 2 and "already holds a run" in capsys.readouterr().err
    # A user's run.json that is not a run's settings does not make a directory ours.
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "run.json").write_text('{"settings": {"speed": 3}, "derived": {}}')
    assert not is_run_dir(tmp_path / "user")


def test_a_refused_tensorboard_run_leaves_nothing_so_a_retry_without_it_works(assets, tmp_path, monkeypatch) -> None:
    import sys

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
        assert lora_run(assets, out, "--tensorboard") == 2
    assert not out.exists()
    assert lora_run(assets, out) == 0


@pytest.mark.parametrize(("umask", "directory", "file"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_atomic_directory_follows_the_umask(tmp_path, umask, directory, file) -> None:
    from safetensors.torch import save_file

    previous = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "adapter", marker="config.json") as tmp:
            (tmp / "config.json").write_text("{}")
            save_file({}, str(tmp / "weights.safetensors"))  # safetensors itself makes 0600 files
            (tmp / "sub").mkdir()
    finally:
        os.umask(previous)
    assert mode(tmp_path / "adapter") == mode(tmp_path / "adapter" / "sub") == directory
    assert mode(tmp_path / "adapter" / "config.json") == mode(tmp_path / "adapter" / "weights.safetensors") == file


def _no_space_from_rust(file) -> None:
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _no_space_under_a_runtime_error(file) -> None:
    """What torch.save does when a write fails: a RuntimeError raised while handling the OSError."""
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None


@pytest.mark.parametrize("write", [_no_space_from_rust, _no_space_under_a_runtime_error], ids=["rust", "torch"])
def test_a_refused_write_names_the_file_whichever_library_wrote(tmp_path, write) -> None:
    """The libraries report a full disk in their own ways; the command reports it in one (the fault table writes
    on a real full tmpfs: test_faults.py)."""
    with pytest.raises(WriteError) as error:
        atomic_write(tmp_path / "checkpoint.pt", write)
    assert str(error.value) == f"cannot write {tmp_path / 'checkpoint.pt'}: No space left on device"
    adapter = tmp_path / "adapter"
    with (
        pytest.raises(WriteError, match="cannot write .*adapter: No space left"),
        atomic_directory(adapter, "x") as tmp,
    ):
        write(tmp / "weights")
    assert list(tmp_path.iterdir()) == []  # no temporary file or directory left
    with pytest.raises(ValueError, match="not a write error"):  # other errors pass unchanged
        atomic_write(tmp_path / "x", lambda file: (_ for _ in ()).throw(ValueError("not a write error")))


def test_a_run_that_stopped_before_its_settings_counts_as_new(tmp_path, capsys) -> None:
    """A full disk (or a signal) right after the marker: only the marker, the lock and a torn run.json are there.
    inspect and --resume say what to do; the same command runs there again (test_faults.py, full-disk-run.json)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER_FILE).write_text(json.dumps({"format": "adalora-run", "format_version": 1}))
    (run / ".run.json.abc123.tmp").write_text("{")
    (run / ".adalora-run.lock").write_text("12345 adalora train\n")  # stale: its process is gone
    assert is_unstarted(run) and is_run_dir(run)
    assert main(["inspect", str(run)]) == 0
    assert "status: not started; the run in" in capsys.readouterr().out
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stopped before it started (no run.json): start it again with the same" in err
    check_new_run(run, overwrite=False)  # no "already holds a run"
