"""Errors a user can cause, and the one way their messages are cut to a line.

The CLI prints an :class:`OptiflowError` as one line and exits with its ``exit_code``.
"""

import errno
import re
import shutil
import signal
from pathlib import Path

MAX_LINE = 300
# ``scheme://user:password@host``: the password part of any URL in a text
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):[^\s@/]*@")


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL in it masked as ``***``.

    Everything optiflow logs (params, tags, configuration files) and every error line it prints goes
    through this, so a password typed into ``--storage`` or ``--tracking-uri`` is never stored or shown.
    """
    return _URL_PASSWORD.sub(r"\1:***@", text)


def first_line(error: "BaseException | str") -> str:
    """The first non-empty line of an error message, at most 300 characters.

    An exception with no message gives its type name; an ``OSError`` gives
    ``strerror: filename``.  Never raises, whatever the message is.
    """
    if isinstance(error, OSError) and error.strerror:
        text = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
        return redact(text)[:MAX_LINE]
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines:
        return redact(lines[0])[:MAX_LINE]
    return type(error).__name__ if isinstance(error, BaseException) else ""


class OptiflowError(Exception):
    """A mistake in the user's input or environment, explained in one sentence."""

    exit_code = 2


class ServiceLost(OptiflowError):
    """A service the command depends on (the study's database, the tracking server) stopped answering."""

    exit_code = 1


class TrackingServerLost(ServiceLost):
    """The MLflow tracking server stopped answering: nothing more can be logged to the run."""


class StoreLost(TrackingServerLost):
    """The tracking store's database file was deleted or replaced under a run: nothing more can be logged to it."""


class TrainingError(OptiflowError):
    """Training stopped because of what happened during it (e.g. a non-finite loss)."""

    exit_code = 1


class DiskFull(OptiflowError):
    """A write found no space left (ENOSPC, a quota, SQLite's "database or disk is full"): the machine's
    trouble, not the input's, so exit code 1."""

    exit_code = 1


def no_space(error: "BaseException | None", path: "str | Path", needed: "int | None" = None) -> "DiskFull | None":
    """A :class:`DiskFull` naming ``path``, its free space and the ``needed`` bytes (when known) if ``error``
    (or what caused it) is a write that found the device full, else None."""
    for _ in range(10):
        if error is None:
            return None
        text = str(error)
        if (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or "disk is full" in text \
                or "No space left" in text:
            more = f", {needed // 1000 + 1} kB needed" if needed else ", more needed"
            return DiskFull(f"no space left on the device holding {path} ({_free(path)}{more}); "
                            "free some space and run again")
        error = error.__cause__ or error.__context__
    return None


def _free(path: "str | Path") -> str:
    """``12 kB free`` for the nearest existing folder of ``path``, or ``no space`` when it cannot be told."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "no space"
    return f"{free // 1000} kB free" if free < 10**7 else f"{free // 10**6} MB free"


class RunKilled(Exception):
    """Raised from a training callback to end the run KILLED: stopped on purpose, not failed (a pruned trial)."""


class PluginError(TrainingError):
    """A plugin's hook raised during training; ``plugin`` names it, ``__cause__`` is what it raised."""

    def __init__(self, message: str, plugin: str) -> None:
        super().__init__(message)
        self.plugin = plugin


class RunInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM arrived during training; the process exits with 128 + the signal number."""

    def __init__(self, signum: int = signal.SIGINT, message: str = "") -> None:
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)
