"""Whether the process training a RUNNING run is still there.

Each run carries the tag ``optiflow.heartbeat`` = ``HOST PID UNIX_TIME``, written in the call that
creates (or reopens) the run and renewed every ``OPTIFLOW_HEARTBEAT_SECONDS`` (default 60) by a
background thread of each process working for it: a training, and a search's or comparison's parent
run (every search worker beats the parent). A SIGKILL or the OOM killer leaves the run RUNNING; it
is *stale* when its process is gone: on the same host the pid no longer lives, elsewhere the
heartbeat is older than ``OPTIFLOW_STALE_AFTER`` seconds (default one hour). ``train --resume``
continues a stale run and ``optiflow runs --stale`` lists (``--close``: ends KILLED) them; a run
whose process may still live is never taken over, so no two processes train one run.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from optiflow.runlog import RunTracker

from optiflow.errors import OptiflowError

TAG = "optiflow.heartbeat"
STALE_AFTER_ENV = "OPTIFLOW_STALE_AFTER"
STALE_AFTER_S = 3600.0
EVERY_ENV = "OPTIFLOW_HEARTBEAT_SECONDS"
EVERY_S = 60.0
#: how often a training saves its checkpoint (read by optiflow.checkpoints; checked here with the others)
CHECKPOINT_EVERY_ENV = "OPTIFLOW_CHECKPOINT_SECONDS"


def seconds(name: str, default: float | None) -> float | None:
    """The number of seconds environment variable ``name`` sets (``default`` when unset or empty); a value that
    is no finite number >= 0 is one line (OptiflowError)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise OptiflowError(f"${name} must be a number of seconds >= 0, got {text[:40]!r}")
    return value


def check_settings() -> None:
    """Refuse a bad ``OPTIFLOW_*_SECONDS`` / ``OPTIFLOW_STALE_AFTER`` before any run opens."""
    for name in (EVERY_ENV, STALE_AFTER_ENV, CHECKPOINT_EVERY_ENV):
        seconds(name, None)


def stamp() -> str:
    """The heartbeat of this process now: ``HOST PID UNIX_TIME``."""
    return f"{socket.gethostname()} {os.getpid()} {time.time():.0f}"


def beat(tracker: RunTracker) -> None:
    """Record on the tracker's run that this process is alive now."""
    tracker.set_tags({TAG: stamp()})


@contextlib.contextmanager
def beating(tracker: RunTracker) -> Iterator[None]:
    """Beat ``tracker``'s run every ``OPTIFLOW_HEARTBEAT_SECONDS`` from a daemon thread while the block runs
    (a beat that fails is skipped: the block's own next write to the store says what is wrong)."""
    stop = threading.Event()
    every = max(seconds(EVERY_ENV, EVERY_S) or 0.0, 0.05)

    def keep_beating() -> None:
        while not stop.wait(every):
            with contextlib.suppress(Exception):
                beat(tracker)

    thread = threading.Thread(target=keep_beating, name="optiflow-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def gone(tags: dict[str, str], now: float | None = None) -> str | None:
    """Why the process behind a RUNNING run with these ``tags`` is gone, or None when it may still live."""
    try:
        host, pid_text, stamp = tags[TAG].split(" ")
        pid, at = int(pid_text), float(stamp)
    except (KeyError, ValueError):
        return None
    age = (now if now is not None else time.time()) - at
    if host == socket.gethostname():
        return None if _alive(pid) else f"its process {pid} on this host is gone"
    limit = seconds(STALE_AFTER_ENV, STALE_AFTER_S) or 0.0
    return f"its heartbeat from {host} is {age:.0f} s old" if age > limit else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
