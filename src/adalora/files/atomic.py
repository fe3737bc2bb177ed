"""Writes that never leave a half-written file or directory: temporary copy, fsync, then one rename.

- :func:`atomic_write`: one file (a temporary file in the same directory, ``fsync``, ``os.replace``);
- :func:`atomic_directory`: a whole directory (an adapter, a PEFT export, a merged model) swapped in at once;
- :func:`write_json` / :func:`read_json`: the JSON files of a run.

A write the system refuses (a full disk, a quota, an I/O error, permissions changed meanwhile) raises
:class:`WriteError` naming the file or directory that was being written, whichever library did the writing
(safetensors, torch.save, matplotlib, json), and leaves no temporary file behind.

Files and directories follow the process umask, like everything else the user creates.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


class WriteError(OSError):
    """The system refused to write ``filename`` (``errno``, ``strerror``: e.g. ENOSPC, no space left on device)."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


# How Rust's std::io::Error ends its message (safetensors' SafetensorError carries one): "... (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def os_error(error: BaseException) -> OSError | None:
    """The operating-system error behind ``error``, if there is one: ``error`` itself, the error it was raised
    from or while handling (torch.save reports a failed write as a RuntimeError raised during the OSError), or
    the ``(os error N)`` of an error from Rust code (safetensors)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError):
            return error
        if match := _RUST_OS_ERROR.search(str(error)):
            number = int(match.group(1))
            return OSError(number, os.strerror(number))
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return None


@contextlib.contextmanager
def reporting_writes(path: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raise a failure of the system while writing ``path`` as :class:`WriteError` naming ``path``; other
    errors pass unchanged."""
    try:
        yield
    except WriteError:
        raise
    except Exception as error:
        cause = os_error(error)
        if cause is None or cause.errno is None:
            raise
        raise WriteError(cause.errno, cause.strerror or os.strerror(cause.errno), str(path)) from error


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` all at once: ``write(file)`` fills a temporary file that then replaces ``path``.

    Args:
        path: destination; its directory must exist.
        write: called with a binary file object open for writing.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        WriteError: if the system refuses the write (``path`` is then as it was).
    """
    path = Path(path)
    with reporting_writes(path):
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
            with os.fdopen(descriptor, "wb") as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    # Make the rename itself durable (POSIX; directories cannot be opened on Windows).
    if hasattr(os, "O_DIRECTORY"):
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, data: Any) -> Path:
    """Atomically write ``data`` as indented JSON."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike[str], marker: str) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``directory`` in one step, on error it is removed.

    Files written into the temporary directory are fsync'ed before the swap. On Linux the swap is an atomic
    exchange (``renameat2(RENAME_EXCHANGE)``); elsewhere the old directory is renamed aside first, so a crash at
    that instant leaves it beside the target as ``.<name>.old-*`` rather than half-written in place.

    Args:
        directory: the directory to create or replace.
        marker: a file name that an existing ``directory`` must contain to be replaced (e.g. ``adalora_config.json``);
            a non-empty directory without it is never overwritten.

    Raises:
        ValueError: if ``directory`` is a file, or a non-empty directory that does not contain ``marker``.
        WriteError: if the system refuses a write (``directory`` is then as it was).
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"'{directory}' exists and is a file; choose a directory path.")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / marker).exists():
        raise ValueError(
            f"'{directory}' exists, is not empty and has no {marker}: refusing to replace it. Choose a new or empty "
            "directory."
        )
    with reporting_writes(directory):
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        with reporting_writes(directory):
            yield tmp
            _follow_umask(tmp)
            _fsync_tree(tmp)
            if directory.exists():
                if not _exchange(tmp, directory):
                    old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
                    os.replace(directory, old)
                    try:
                        os.replace(tmp, directory)
                    except BaseException:
                        os.replace(old, directory)  # put the previous version back
                        raise
                    tmp = old
                # After the exchange or the renames, tmp holds the previous version; the new one is in place.
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.replace(tmp, directory)
            _fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _follow_umask(root: Path) -> None:
    """Give ``root`` and everything in it the permissions a new file or directory gets from the umask.

    ``mkdtemp`` makes the directory 0700, and some writers (safetensors) make 0600 files: without this, another
    user of a shared machine could not read a saved adapter or model.
    """
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28 or another libc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
