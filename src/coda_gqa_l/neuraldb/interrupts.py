"""Ctrl-C during a long ingest, acted on even when Python drops it.

Python raises ``KeyboardInterrupt`` at whatever bytecode the main thread runs when the signal arrives. If that is a
finalizer (an object's ``__del__``, a weakref callback, run by the garbage collector in the middle of an ingest),
Python prints "Exception ignored in ..." and goes on: the ingest would keep reading (tests/neuraldb/test_interrupts.py
shows the drop). Inside ``catch_ctrl_c`` a Ctrl-C raises as usual and is also remembered, and ``stop_if_asked``
(called after every chunk an ingest reads) raises it again.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_asked = threading.Event()


@contextlib.contextmanager
def catch_ctrl_c() -> Iterator[None]:
    """Inside, Ctrl-C raises ``KeyboardInterrupt`` and is remembered for ``stop_if_asked``. It changes nothing outside
    the main thread (where Python cannot install signal handlers) or where SIGINT does not have Python's own handler
    (ignored, as in a shell's background job, or handled by the caller)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return

    def on_ctrl_c(signum: int, frame: FrameType | None) -> None:
        _asked.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _asked.clear()


def stop_if_asked() -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed inside ``catch_ctrl_c`` (it may have been dropped)."""
    if _asked.is_set():
        raise KeyboardInterrupt
