"""Stopping a run on a signal without losing its work: one mechanism for SIGINT (Ctrl-C), SIGTERM (what
``kill``, ``docker stop``, batch schedulers and spot-instance reclaims send) and SIGHUP (a closed terminal or SSH
session).

While the training loop runs, a signal is a request: the run finishes the optimizer step under way, writes a
checkpoint at that step boundary (unless it has just written one) and raises :class:`Stopped`, so that
``adalora train --resume`` continues exactly there and ends as the uninterrupted run would. Before the loop
(loading) and after it (the final save) there is no step to finish: :class:`Stopped` is raised at once, and the
atomic writes (files/atomic.py) leave every file as it was. A second signal while a checkpoint is pending stops
at once (a step can be long); the last checkpoint stays.

``adalora train`` then exits with 128 + the signal's number, as a shell reports a process that the signal
ended: 130 (SIGINT), 143 (SIGTERM), 129 (SIGHUP). Under ``torchrun`` every process stops at the same step when
any of them was signalled (one all-reduce per step). A signal that was ignored when the run started (SIGHUP under
``nohup``, SIGINT of a background job) stays ignored; outside the main thread nothing is installed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from .. import parallel

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal (a :class:`KeyboardInterrupt`, so that what stops on Ctrl-C stops on it too).

    Attributes:
        signum: the signal.
        step: the optimizer step of the checkpoint written on the way out, or None if none was written.
        total: the run's total steps (with ``step``).
    """

    def __init__(self, signum: int, step: int | None = None, total: int | None = None) -> None:
        super().__init__(signum, step, total)
        self.signum, self.step, self.total = signum, step, total

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopRequests:
    """Signal handlers for the length of a run (a context manager): see the module docstring."""

    def __init__(self) -> None:
        self.signum: int | None = None  # a signal received while training, not acted on yet
        self._deferring = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._deferring and self.signum is None:
            self.signum = signum  # acted on at the next step boundary
            return
        raise Stopped(signum)

    @contextlib.contextmanager
    def at_step_boundaries(self) -> Iterator[None]:
        """Within the ``with``, a signal waits for :meth:`check` (called after every optimizer step)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def check(self, step: int, total: int, saved_step: int | None, checkpoint: Callable[[], None]) -> None:
        """At a step boundary: if a signal came (on any process), checkpoint unless ``saved_step == step`` and
        raise :class:`Stopped`."""
        asked = self.signum is not None
        if parallel.is_distributed():  # every process stops at the same step if any was signalled
            asked = parallel.mean_over_processes(float(asked)) > 0
        if not asked:
            return
        if saved_step != step:
            checkpoint()
        raise Stopped(self.signum or signal.SIGTERM, step, total)
