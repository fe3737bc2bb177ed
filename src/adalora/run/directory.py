"""The output directory of a run: the files a run writes there, which directories it may write into (recognised by
our own marker file), what ``--overwrite`` removes, and the ``run.json`` that ``--resume`` reads.

A run writes :data:`MARKER_FILE` first, before anything else. A directory is *a run of
ours* when it holds that marker (or, for runs written before the marker existed, a ``run.json`` whose content is
a run's settings); file names a user might also have (``metrics.json``, ``adapter/``) prove nothing. A directory
holding nothing but what a run writes before its ``run.json`` (the marker, the lock of lock.py, their temporary
files) is a run that never started, for instance on a full disk: it counts as a new, empty directory, so the
same command runs there again. The checks here only read: they run before a model loads and before anything is
written, so a refused command leaves the directory as it was. What each file holds: docs/cli.md, "Output directory".
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..files.atomic import read_json, write_json
from .settings import RUN_FIELDS, RunError

# The files of an output directory (docs/cli.md, "Output directory").
MARKER_FILE = ".adalora-run"  # written first: says the directory is a run of ours
LOCK_FILE = ".adalora-run.lock"  # held by the one command using the directory (lock.py); removed after it
RUN_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"  # the one before (files/checkpoint.py: previous_checkpoint)
METRICS_FILE = "metrics.json"
RANKS_FILE = "rank_pattern.json"
HISTORY_FILE = "allocation_history.json"
HEATMAP_FILE = "rank_heatmap.png"
BUDGET_FILE = "budget_curve.png"
OUTPUTS = (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE, METRICS_FILE, RANKS_FILE, HISTORY_FILE, HEATMAP_FILE, BUDGET_FILE)
OUTPUT_DIRS = ("adapter", "model", "tensorboard")

MARKER = {"format": "adalora-run", "format_version": 1}
RUN_FORMAT_VERSION = 1  # of run.json


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_run_dir(path: str | Path) -> bool:
    """True if ``path`` is a directory that a run of ours wrote (see the module docstring)."""
    path = Path(path)
    marker = _read_json(path / MARKER_FILE)
    if isinstance(marker, dict) and marker.get("format") == MARKER["format"]:
        return True
    run = _read_json(path / RUN_FILE)  # a run written before the marker: recognised by what run.json says
    if not (isinstance(run, dict) and isinstance(run.get("settings"), dict) and isinstance(run.get("derived"), dict)):
        return False
    return set(run["settings"]) <= set(RUN_FIELDS) and "method" in run["settings"]


def is_unstarted(path: Path) -> bool:
    """True if the directory ``path`` is empty or holds only what a run writes before ``run.json`` (see the module
    docstring): a new run may go there without ``--overwrite``."""
    return all(_written_before_start(entry.name) for entry in path.iterdir())


def _written_before_start(name: str) -> bool:
    return name in (MARKER_FILE, LOCK_FILE) or any(_is_temporary(name, of) for of in (MARKER_FILE, RUN_FILE))


def _is_temporary(name: str, of: str) -> bool:
    """A temporary file of an atomic write of ``of`` (files/atomic.py): ``.<of>.<random>.tmp``."""
    return name.startswith(f".{of}.") and name.endswith(".tmp")


def not_started(path: Path) -> str:
    """What to say about a run directory that :func:`is_unstarted` (for inspect and --resume)."""
    return (
        f"the run in {path} stopped before it started (no {RUN_FILE}): start it again with the same "
        "adalora train command (no --overwrite needed)"
    )


def require_run_dir(path: str | Path, command: str) -> Path:
    """``path`` if it is a run of ours, else :class:`RunError` saying so (for inspect, plot, --resume)."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{command} {path}: no such directory")
    if not path.is_dir():
        raise RunError(f"{command} {path}: a file, not an adalora run directory")
    if not is_run_dir(path):
        raise RunError(
            f"{path} is not an adalora run directory (no {MARKER_FILE}, nor a {RUN_FILE} of a run): {command} "
            "needs a directory written by adalora train"
        )
    return path


def check_writable(path: Path, option: str = "--output-dir", fix: str | None = None) -> None:
    """Raise :class:`RunError` if ``path`` (or, when it does not exist yet, the directory it would be made in)
    cannot be written: a read-only file system, missing permission, or a file in the way.

    Args:
        path: the directory to write.
        option: how the user named it, for the message (``--output-dir``).
        fix: what to do about it; default: choose another ``option`` or make it writable.
    """
    fix = fix or f"choose another {option} or make it writable"
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise RunError(f"{option} {path}: {existing} is a file, not a directory; {fix}")
    read_only = hasattr(os, "statvfs") and bool(os.statvfs(existing).f_flag & getattr(os, "ST_RDONLY", 1))
    if read_only or not os.access(existing, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if read_only else "is not writable (permission denied)"
        where = "" if existing == path else f" (it would be created in {existing}, which {why})"
        raise RunError(
            f"cannot write to {option} {path}{where or ': it ' + why}; choose another {option} or make it writable"
        )


def check_new_run(path: Path, overwrite: bool) -> None:
    """Where a new run may go: a new or empty directory, or a run of ours (finished or not) with --overwrite.

    Raises:
        RunError: for a file, a directory holding other files, or a run without ``--overwrite``.
    """
    if path.exists() and not path.is_dir():
        raise RunError(f"--output-dir {path} is a file; choose a directory")
    if path.is_dir() and not is_unstarted(path):
        if not is_run_dir(path):
            raise RunError(
                f"--output-dir {path} holds files that are not an adalora run; choose a new or empty directory "
                "(--overwrite only replaces runs of adalora)"
            )
        if not overwrite:
            raise RunError(
                f"{path} already holds a run: continue it with `adalora train --resume {path}`, "
                "start over with --overwrite, or choose another --output-dir"
            )
    check_writable(path)


def read_run_file(path: Path) -> dict[str, object]:
    """``run.json`` of a run of ours that started, for ``--resume``.

    Raises:
        RunError: in one line, if ``path`` is not a run of ours, never started, or its ``run.json`` or marker is
            missing, damaged or of another format version than this adalora writes.
    """
    require_run_dir(path, "--resume")
    if is_unstarted(path):
        raise RunError(f"--resume {path}: {not_started(path)}")
    if not (path / RUN_FILE).is_file():
        raise RunError(f"--resume {path}: no run to continue there ({RUN_FILE} is missing)")
    files = {}
    for name, expected in ((MARKER_FILE, MARKER["format_version"]), (RUN_FILE, RUN_FORMAT_VERSION)):
        try:
            files[name] = read_json(path / name) if (path / name).is_file() else {}
        except (OSError, ValueError) as error:
            raise RunError(f"{path / name} cannot be read ({error}); the run directory is damaged") from None
        version = files[name].get("format_version") if isinstance(files[name], dict) else None
        if version != expected:
            found = "no format_version (an older adalora's)" if version is None else f"format_version {version!r}"
            raise RunError(
                f"cannot resume {path}: its {name} has {found}, this adalora reads version {expected} only; "
                "start the run over with --overwrite"
            )
    return files[RUN_FILE]


def check_resumable(path: Path, run_file: dict[str, object]) -> None:
    """The run of ``run_file`` (:func:`read_run_file`) has neither failed nor finished, and can be written."""
    failure = run_file.get("failure")
    if isinstance(failure, dict):
        raise RunError(f"cannot resume {path}: it failed: {failure.get('message')}")
    if (path / METRICS_FILE).is_file():
        raise RunError(f"the run in {path} is already complete; see `adalora inspect {path}`")
    check_writable(path, "--resume", "make it writable, or copy the run somewhere writable and resume it there")


def how_to_continue(path: Path) -> str:
    """``continue with: adalora train --resume DIR``, or what else fits the state the directory ``path`` is in
    (after a run stopped by a signal or a full disk)."""
    if (path / METRICS_FILE).is_file():
        return f"the run is complete; see adalora inspect {path}"
    if not path.is_dir() or not is_run_dir(path) or is_unstarted(path):
        return "run the same command again"
    return f"continue with: adalora train --resume {path}"


def claim(path: Path) -> None:
    """Create ``path`` if needed and mark it as a run of ours (the first thing a run writes)."""
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARKER_FILE).is_file():
        write_json(path / MARKER_FILE, MARKER)


def clear_outputs(path: Path) -> None:
    """Remove what a run of ours wrote in ``path`` (its files, folders and torn temporary files), and nothing
    else: files the user put beside them stay. Does nothing unless ``path`` is a run of ours."""
    if not is_run_dir(path):
        return
    for name in (RUN_FILE, *OUTPUTS):
        (path / name).unlink(missing_ok=True)
    for name in OUTPUT_DIRS:
        if (path / name).is_dir():
            shutil.rmtree(path / name)
    remove_torn_writes(path)


def remove_torn_writes(path: Path) -> None:
    """Temporary files and directories of writes killed half-way (files/atomic.py): a checkpoint, the final
    adapter, a figure. What they were writing is either still there as before, or written again."""
    for name in (MARKER_FILE, RUN_FILE, *OUTPUTS):
        for torn in path.glob(f".{name}.*.tmp"):
            torn.unlink()
    for name in OUTPUT_DIRS:  # temporary directories of directory swaps killed half-way
        for torn in [*path.glob(f".{name}.tmp-*"), *path.glob(f".{name}.old-*")]:
            shutil.rmtree(torn, ignore_errors=True)
