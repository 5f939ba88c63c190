"""Signals during training: SIGINT/SIGTERM become :class:`RunInterrupted` at a safe point.

The runner enters :class:`InterruptGuard` for the length of a run; writes that must
not be torn in half (an epoch's metrics and checkpoint, an MLflow call) run inside
:func:`deferred`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from optiflow.errors import RunInterrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_deferring = 0
_pending: int | None = None


class InterruptGuard:
    """While entered (in the main thread), SIGINT and SIGTERM raise :class:`RunInterrupted`.

    Inside :func:`deferred` blocks the first signal waits for the block's end,
    so an MLflow write or an epoch's bookkeeping is never torn in half; a second
    signal raises at once.
    """

    def __init__(self) -> None:
        self._previous: dict[int, signal._HANDLER] = {}

    def __enter__(self) -> InterruptGuard:
        global _pending
        if threading.current_thread() is threading.main_thread():
            _pending = None
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, _handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def _handle(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _deferring and _pending is None:
        _pending = signum
        return
    _pending = None
    raise RunInterrupted(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block that a signal does not interrupt (main thread only): it is raised when the block ends."""
    global _deferring, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and _pending is not None:
        signum, _pending = _pending, None
        raise RunInterrupted(signum)
