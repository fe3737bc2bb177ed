"""One run per directory: a command that writes or reads a run holds the lock of its directory for as long as
it works there, and a second command that needs the directory meanwhile is refused in one line naming the
holder's process id, before it reads or writes anything there.

- ``adalora train`` (a new run, ``--resume``, ``--overwrite``) holds the lock of its output directory
  exclusively, from before its first check of the directory to its last file: checking that the directory
  may hold a new run and claiming it are one step for every other process.
- ``export``, ``merge`` and ``plot`` hold it shared, on the run they read and on a run they write into (an
  export's default ``--out`` is inside the run): they can run side by side, but not beside a training run
  there, which would give them half a run (or an old adapter that an ``--overwrite`` is about to replace).

The lock is ``fcntl.flock`` on :data:`~adalora.run.directory.LOCK_FILE` in the directory. The kernel releases it
when its holder exits, however it exits (SIGKILL, a crash), so a lock of a dead process never blocks: the file
it left is simply locked again. The holder writes its process id and command into the file (for the message);
the last holder removes the file, and a new or refused run removes the directory it created for the lock, so
a refused command leaves the directory as it was. Where no lock file can be made (a read-only file system, no
write permission, Windows), nothing is locked: nothing can be written there either, and the checks that follow
say so. Under ``torchrun`` rank 0 locks for all processes, and every process learns whether it got the lock.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .. import parallel
from .directory import LOCK_FILE, is_run_dir
from .settings import RunError

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]


class RunInUse(RunError):
    """Another process holds the lock of the directory (the message names it and says what to do)."""


def holder(directory: Path) -> str | None:
    """Who holds the lock of ``directory`` (``"adalora train, pid 123"``), or None if nobody does."""
    path = directory / LOCK_FILE
    if fcntl is None:
        return None
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _describe_holder(descriptor)
    finally:
        os.close(descriptor)
    return None


@contextlib.contextmanager
def locked(directory: Path, command: str, *, exclusive: bool, fix: str, create: bool = False) -> Iterator[None]:
    """Hold the lock of ``directory`` for the body of the ``with``.

    Args:
        directory: the run directory.
        command: what the holder does, for the message of whoever is refused (``"train"``).
        exclusive: no other holder at all (``train``), or shared with other shared holders (``export``).
        fix: what a refused user can do, for the end of the message.
        create: make ``directory`` (and its missing parents) first; the ones made are removed again at the end
            if nothing else was written in them.

    Raises:
        RunInUse: if another process holds the lock in a conflicting mode.
    """
    created = _make_directories(directory) if create else []
    try:
        descriptor = _acquire(directory, command, exclusive, fix)
        try:
            yield
        finally:
            if descriptor is not None:
                _release(directory, descriptor)
    finally:
        for made in reversed(created):  # the deepest first; only if still empty
            try:
                made.rmdir()
            except OSError:
                break


@contextlib.contextmanager
def locked_for_all_processes(directory: Path, command: str, *, fix: str, create: bool) -> Iterator[None]:
    """:func:`locked` exclusively, taken by rank 0 for every process (``train``): refused on every process when
    rank 0 is refused, so that none waits for the others."""
    with contextlib.ExitStack() as stack:
        refusal = None
        if parallel.is_main_process():
            try:
                stack.enter_context(locked(directory, command, exclusive=True, fix=fix, create=create))
            except RunInUse as error:
                refusal = str(error)
        refusal = parallel.from_main_process(refusal)
        if refusal is not None:
            raise RunInUse(refusal)
        yield


@contextlib.contextmanager
def locked_runs(paths: Iterable[Path], command: str, *, fix: str) -> Iterator[None]:
    """Shared locks on those of ``paths`` that are run directories of ours (``export``, ``merge``, ``plot``)."""
    with contextlib.ExitStack() as stack:
        seen: set[Path] = set()
        for path in paths:
            path = Path(os.path.abspath(path))
            if path in seen or not path.is_dir() or not (is_run_dir(path) or (path / LOCK_FILE).exists()):
                continue
            seen.add(path)
            stack.enter_context(locked(path, command, exclusive=False, fix=fix))
        yield


def _make_directories(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; returns those created, outermost first (none if it cannot
    be created: the checks that follow say why)."""
    missing = []
    path = Path(os.path.abspath(directory))
    while not path.exists() and path.parent != path:
        missing.append(path)
        path = path.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue  # made by another process meanwhile: not ours to remove
        except OSError:
            break
        created.append(path)
    return created


def _acquire(directory: Path, command: str, exclusive: bool, fix: str) -> int | None:
    """An open descriptor of the lock file holding the lock, or None where no lock file can be made."""
    if fcntl is None or not directory.is_dir():
        return None
    path = directory / LOCK_FILE
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError:
            return None
        try:
            fcntl.flock(descriptor, mode | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                os.close(descriptor)
                return None  # a file system without locks
            who = _describe_holder(descriptor)
            os.close(descriptor)
            raise RunInUse(f"{directory} is in use by {who}; wait for it to finish{fix}") from None
        # The holder before us may have removed the file between our open and our lock: lock the one there now.
        if _same_file(descriptor, path):
            break
        os.close(descriptor)
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()} adalora {command}\n".encode(), 0)
    except OSError:
        pass  # a full disk: the lock holds all the same, only the message will lack the pid
    return descriptor


def _release(directory: Path, descriptor: int) -> None:
    """Unlock and close; the last holder (the one that can lock exclusively) removes the file."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _same_file(descriptor, directory / LOCK_FILE):
            (directory / LOCK_FILE).unlink()
    except OSError:
        pass  # another shared holder is still there: it removes the file
    finally:
        os.close(descriptor)


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        here, there = os.fstat(descriptor), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _describe_holder(descriptor: int) -> str:
    """``adalora train (pid 123)`` from the lock file's content; ``another adalora process`` if it says nothing."""
    try:
        text = os.pread(descriptor, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    pid, _, command = text.partition(" ")
    if not pid.isdigit():
        return "another adalora process"
    return f"{command or 'adalora'} (pid {pid})"
