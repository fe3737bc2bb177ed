"""The lock of a run directory (run/lock.py): exclusive against everything, shared with shared holders, released
by the kernel when its holder dies, its file removed by the last holder, nothing left by a refused command.
The faults it prevents, end to end: tests/run/test_faults.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from adalora.run.directory import LOCK_FILE
from adalora.run.lock import RunInUse, holder, locked

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")


def refused(directory, command: str = "train", exclusive: bool = True) -> str:
    """The message of a lock attempt on ``directory`` that must be refused."""
    with pytest.raises(RunInUse) as error, locked(directory, command, exclusive=exclusive, fix=""):
        pass
    return str(error.value)


HOLD = """
import sys, time
from pathlib import Path
from adalora.run.lock import locked
with locked(Path(sys.argv[1]), "train", exclusive=True, fix="", create=True):
    print("held", flush=True)
    time.sleep(600)
"""


def test_an_exclusive_holder_refuses_everyone_and_says_who_it_is(tmp_path) -> None:
    with locked(tmp_path, "train", exclusive=True, fix=", or choose another --output-dir"):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()} adalora train\n"
        assert holder(tmp_path) == f"adalora train (pid {os.getpid()})"
        message = f"{tmp_path} is in use by adalora train (pid {os.getpid()}); wait for it to finish"
        assert refused(tmp_path, "train") == refused(tmp_path, "export", exclusive=False) == message
    assert holder(tmp_path) is None and list(tmp_path.iterdir()) == []  # released: the file is gone


def test_shared_holders_share_and_the_last_one_removes_the_file(tmp_path) -> None:
    with locked(tmp_path, "export", exclusive=False, fix=""):
        with locked(tmp_path, "merge", exclusive=False, fix=""):
            assert "in use by adalora merge (pid" in refused(tmp_path)  # the last holder to write its pid
        assert (tmp_path / LOCK_FILE).exists()  # the export still holds it
        assert "in use by" in refused(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_refused_new_run_leaves_no_directory_behind(tmp_path) -> None:
    """The lock of a new run creates its directory; if the run stops before writing anything, it goes again."""
    target = tmp_path / "a" / "b" / "run"
    with (
        pytest.raises(ValueError, match="a check refused"),
        locked(target, "train", exclusive=True, fix="", create=True),
    ):
        assert (target / LOCK_FILE).is_file()
        raise ValueError("a check refused the run")
    assert list(tmp_path.iterdir()) == []
    with locked(target, "train", exclusive=True, fix="", create=True):
        (target / "run.json").write_text("{}")  # the run wrote something: its directory stays
    assert sorted(p.name for p in target.iterdir()) == ["run.json"]


@pytest.mark.slow
def test_the_lock_of_a_killed_process_does_not_block(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "held\n"
        assert f"adalora train (pid {process.pid})" in refused(tmp_path)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert (tmp_path / LOCK_FILE).read_text() == f"{process.pid} adalora train\n"  # left behind, stale
    assert holder(tmp_path) is None
    with locked(tmp_path, "train", exclusive=True, fix=""):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()} adalora train\n"
    assert list(tmp_path.iterdir()) == []


def test_a_lock_file_removed_between_open_and_lock_is_not_trusted(tmp_path, monkeypatch) -> None:
    """The holder before us may remove the file after we opened it: we must lock the file that is there then,
    or a third process could hold the new file while we hold the removed one."""
    import adalora.run.lock as lock

    original, calls = lock.fcntl.flock, []

    def flock(descriptor, operation):
        if not calls:  # the first attempt: the previous holder releases and removes the file meanwhile
            (tmp_path / LOCK_FILE).unlink()
        calls.append(operation)
        return original(descriptor, operation)

    monkeypatch.setattr(lock.fcntl, "flock", flock)
    with locked(tmp_path, "train", exclusive=True, fix=""):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()} adalora train\n"
        assert len(calls) == 2  # the second attempt locked the file in place
    assert list(tmp_path.iterdir()) == []


def test_nothing_is_locked_where_nothing_can_be_written(tmp_path) -> None:
    missing = tmp_path / "no" / "such"
    with locked(missing, "export", exclusive=False, fix=""):  # not created without create=True
        assert not missing.exists()
