"""Errors a user can cause.  The CLI prints them as one line and exits non-zero."""

import signal


class OptiflowError(Exception):
    """A mistake in the user's input or environment, explained in one sentence."""

    exit_code = 2


class TrainingError(OptiflowError):
    """Training stopped because of what happened during it (e.g. a non-finite loss)."""

    exit_code = 1


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
