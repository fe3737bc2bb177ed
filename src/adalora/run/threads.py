"""How many torch threads a run uses when ``--threads`` is not given, and why.

The default is the CPU cores this process may use (split between the processes a launcher started on this
machine), but no more than the cores that other processes leave idle when the run starts: on a shared machine
an oversubscribed thread team is far slower than a smaller one (measurements in docs/cli.md, "Settings").
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from .. import parallel
from .words import plural


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _proc_stat() -> tuple[int, int, int]:
    """(idle ticks, all ticks, CPUs) from Linux ``/proc/stat``."""
    with open("/proc/stat") as stat:
        lines = stat.read().splitlines()
    ticks = [int(v) for v in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3].isdigit())
    return ticks[3] + ticks[4], sum(ticks), cpus


def idle_cores(window: float = 0.5) -> float | None:
    """How many CPUs other processes leave idle right now (Linux ``/proc/stat`` over ``window`` seconds).

    Returns None where this cannot be measured.
    """
    try:
        idle_before, total_before, cpus = _proc_stat()
        time.sleep(window)
        idle_after, total_after, _ = _proc_stat()
    except (OSError, ValueError, IndexError):
        return None
    if total_after <= total_before:
        return None
    return cpus * (idle_after - idle_before) / (total_after - total_before)


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count chosen for a run and the reason, for the run's log."""

    threads: int
    reason: str


def choose_threads() -> ThreadChoice:
    """Torch threads for this process: its cores, but no more than the other processes leave idle."""
    processes = parallel.get_local_world_size()
    cores = max(1, available_cores() // processes)
    share = f" (of {available_cores()}, shared by {processes} processes)" if processes > 1 else ""
    idle = idle_cores()
    if idle is None:
        return ThreadChoice(cores, f"{plural(cores, 'core')} available{share}; idle cores not measurable here")
    threads = max(1, min(cores, round(idle / processes)))
    reason = f"{plural(cores, 'core')} available{share}, {idle:.1f} idle"
    if threads < cores:
        reason += ": other processes are busy, so fewer threads than cores (--threads N to choose)"
    return ThreadChoice(threads, reason)
