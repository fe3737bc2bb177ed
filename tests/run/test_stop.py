"""Signals during a run (run/stop.py): a request while training, acted on at the next step boundary after a
checkpoint; at once elsewhere, or on a second signal; ignored signals stay ignored; the handlers are put back.
End to end (a child process signalled mid-training and during the final save, then resumed): test_faults.py."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator

import pytest

from adalora.run.stop import STOP_SIGNALS, Stopped, StopRequests

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals")


@pytest.fixture(autouse=True)
def _signals_handled() -> Iterator[None]:
    """The signals at their default handlers: a suite started in the background (SIGINT ignored) or under nohup
    (SIGHUP ignored) tests the handlers all the same (StopRequests leaves an ignored signal alone, by design)."""
    default = {signum: signal.SIG_DFL for signum in STOP_SIGNALS} | {signal.SIGINT: signal.default_int_handler}
    previous = {signum: signal.signal(signum, handler) for signum, handler in default.items()}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def test_a_signal_while_training_waits_for_the_step_boundary_and_checkpoints_once() -> None:
    saved = []
    with StopRequests() as stop, stop.at_step_boundaries():
        os.kill(os.getpid(), signal.SIGTERM)  # handled here, between two bytecodes: only recorded
        assert stop.signum == signal.SIGTERM
        with pytest.raises(Stopped) as stopped:
            stop.check(7, 24, saved_step=4, checkpoint=lambda: saved.append(7))
    assert saved == [7]
    assert (stopped.value.name, stopped.value.step, stopped.value.total) == ("SIGTERM", 7, 24)
    assert stopped.value.exit_status == 143 and isinstance(stopped.value, KeyboardInterrupt)


def test_no_second_checkpoint_when_the_step_was_just_saved() -> None:
    saved = []
    with StopRequests() as stop, stop.at_step_boundaries():
        stop.check(3, 24, saved_step=None, checkpoint=lambda: saved.append(3))  # nothing asked: nothing done
        os.kill(os.getpid(), signal.SIGHUP)
        with pytest.raises(Stopped) as stopped:
            stop.check(12, 24, saved_step=12, checkpoint=lambda: saved.append(12))
    assert saved == [] and stopped.value.exit_status == 129


@pytest.mark.parametrize("deferring", [False, True], ids=["outside-training", "second-signal"])
def test_outside_training_or_on_a_second_signal_it_stops_at_once(deferring: bool) -> None:
    with StopRequests() as stop:
        if deferring:
            stop._deferring, stop.signum = True, signal.SIGTERM  # a first signal is already pending
        with pytest.raises(Stopped) as stopped:
            os.kill(os.getpid(), signal.SIGINT)
    assert stopped.value.step is None and stopped.value.exit_status == 130


def test_an_ignored_signal_stays_ignored_and_the_handlers_are_put_back() -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        term = signal.getsignal(signal.SIGTERM)
        with StopRequests():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not term
            os.kill(os.getpid(), signal.SIGHUP)  # nothing happens
        assert signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGHUP, previous)
