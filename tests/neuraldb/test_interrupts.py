"""A Ctrl-C that lands in a finalizer is dropped by Python ("Exception ignored in ..."); inside ``catch_ctrl_c`` it is
remembered, and ``stop_if_asked`` (an ingest calls it after every chunk) raises it again."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator

import pytest

from coda_gqa_l.neuraldb.interrupts import catch_ctrl_c, stop_if_asked


class _CtrlCInFinalizer:
    """Sends the process SIGINT while its finalizer runs: the KeyboardInterrupt is raised there, and dropped."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here, inside the finalizer


@pytest.fixture(autouse=True)
def _pythons_own_handler() -> Iterator[None]:
    """Python's SIGINT handler, whatever the test run has (a shell's background job ignores SIGINT)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c_in_a_finalizer(monkeypatch: pytest.MonkeyPatch) -> None:
    dropped: list[type[BaseException] | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(unraisable.exc_type))
    _CtrlCInFinalizer()  # the only reference goes at once: the finalizer runs now
    assert dropped == [KeyboardInterrupt]  # Python dropped it


def test_a_dropped_ctrl_c_is_raised_at_the_next_check(monkeypatch: pytest.MonkeyPatch) -> None:
    with catch_ctrl_c():
        _ctrl_c_in_a_finalizer(monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            stop_if_asked()
    stop_if_asked()  # leaving forgets it, and puts the previous handler back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_or_taken_sigint_is_left_alone() -> None:
    for handler in (signal.SIG_IGN, lambda signum, frame: None):
        signal.signal(signal.SIGINT, handler)
        with catch_ctrl_c():
            assert signal.getsignal(signal.SIGINT) is handler


def test_without_it_the_ctrl_c_is_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``catch_ctrl_c`` mends: with Python's own handler the interrupt is gone once the finalizer returns."""
    _ctrl_c_in_a_finalizer(monkeypatch)
    stop_if_asked()
