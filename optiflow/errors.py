"""Errors a user can cause.  The CLI prints them as one line and exits non-zero."""


class OptiflowError(Exception):
    """A mistake in the user's input or environment, explained in one sentence."""

    exit_code = 2


class TrainingError(OptiflowError):
    """Training stopped because of what happened during it (e.g. a non-finite loss)."""

    exit_code = 1


class RunKilled(Exception):
    """Raised from a training callback to end the run KILLED: stopped on purpose, not failed (a pruned trial)."""
