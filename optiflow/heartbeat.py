"""Whether the process training a RUNNING run is still there.

Each run carries the tag ``optiflow.heartbeat`` = ``HOST PID UNIX_TIME``, set when it starts
and after every epoch. A SIGKILL or the OOM killer leaves the run RUNNING; it is *stale* when
its process is gone: on the same host the pid no longer lives, elsewhere the heartbeat is
older than ``OPTIFLOW_STALE_AFTER`` seconds (default one hour). ``train --resume`` continues
a stale run and ``optiflow runs --stale`` lists (``--close``: ends KILLED) them; a run whose
process may still live is never taken over, so no two processes train one run.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from optiflow.runlog import RunTracker

TAG = "optiflow.heartbeat"
STALE_AFTER_ENV = "OPTIFLOW_STALE_AFTER"
STALE_AFTER_S = 3600.0


def beat(tracker: RunTracker) -> None:
    """Record on the tracker's run that this process is alive now."""
    tracker.set_tags({TAG: f"{socket.gethostname()} {os.getpid()} {time.time():.0f}"})


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
    limit = float(os.environ.get(STALE_AFTER_ENV) or STALE_AFTER_S)
    return f"its heartbeat from {host} is {age:.0f} s old" if age > limit else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
