"""How long a search or a comparison takes: the ETA from the durations measured so far, and a dry run's
estimate from one calibration epoch trained in this process with nothing logged."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from optiflow.config import RunConfig
from optiflow.values import duration_text

if TYPE_CHECKING:
    from optiflow.run import Run


def eta(durations: Sequence[float], remaining: int, parallel: int = 1) -> float | None:
    """Seconds left for ``remaining`` units of work (trials, runs) at the mean of the ``durations`` measured so
    far, ``parallel`` at a time (in rounds: 3 left on 2 workers take 2 rounds); None before any is measured.

    A pruned trial counts as what it cost (its own, shorter, duration): the mean then carries the share of
    trials the pruner stops early.
    """
    if remaining <= 0:
        return 0.0
    measured = [d for d in durations if math.isfinite(d) and d >= 0]
    if not measured:
        return None
    return statistics.fmean(measured) * math.ceil(remaining / max(1, parallel))


@dataclass(frozen=True)
class Calibration:
    """What one run costs, timed on one epoch: preparing it (data, model, optimizer), one epoch of training
    and validation, and the final test evaluation."""

    setup_seconds: float
    epoch_seconds: float
    test_seconds: float

    def run_seconds(self, epochs: int) -> float:
        return self.setup_seconds + epochs * self.epoch_seconds + self.test_seconds


def calibrate(config: RunConfig) -> Calibration:
    """Train ``config`` for one epoch in this process to time it: no MLflow run opens, no store is touched
    (the run's tracker is a :class:`~optiflow.runlog.NullTracker`)."""
    from optiflow import host
    from optiflow.loop import fit
    from optiflow.plugins import get_plugin_manager
    from optiflow.run import SilentReporter
    from optiflow.training import per_run_plugins, preflight

    pm = get_plugin_manager()
    started = time.perf_counter()
    run = preflight(config.replace(epochs=1), pm=pm)
    with per_run_plugins(run, pm), host.threads(run.setup.threads):
        return _timed([run], started, lambda: fit(run, pm, SilentReporter(), None))


def calibrate_stacked(configs: Sequence[RunConfig]) -> Calibration | None:
    """One epoch of the folds ``configs`` trained at once as one stacked model (:mod:`optiflow.stacked`), the way
    a search trains them, timed as one unit with nothing logged; None when they would train one by one."""
    from optiflow import host
    from optiflow.plugins import get_plugin_manager, get_registry
    from optiflow.run import prepare
    from optiflow.stacked import fit_stacked, why_not_stacked

    pm, registry = get_plugin_manager(), get_registry()
    started = time.perf_counter()
    runs = [prepare(config.replace(epochs=1), registry) for config in configs]
    if why_not_stacked(runs, pm) is not None:
        return None
    with host.threads(runs[0].setup.threads):
        return _timed(runs, started, lambda: fit_stacked(runs, pm))


def _timed(runs: list[Run], started: float, train: Callable[[], None]) -> Calibration:
    """Time ``train`` (one epoch of ``runs``) and their test evaluation, each run's tracker a NullTracker."""
    from optiflow.loop import evaluate
    from optiflow.plugins import get_plugin_manager
    from optiflow.runlog import NullTracker

    for run in runs:
        run.wants_artifacts = False
        run.tracker = NullTracker()
        get_plugin_manager().hook.optiflow_run_start(run=run)
    prepared = time.perf_counter()
    train()
    trained = time.perf_counter()
    for run in runs:
        if len(run.splits.x_test):
            evaluate(run, run.splits.x_test, run.splits.y_test, "test")
    return Calibration(prepared - started, trained - prepared, time.perf_counter() - trained)


@dataclass(frozen=True)
class Tick:
    """One unit of work done (a trial, a run) and where the whole stands: a live bar on a terminal, one
    plain line (:meth:`line`) in a pipe."""

    done: int
    total: int
    #: how the unit ended: "trial 3 complete: val_loss=0.1234  lr=0.01"
    what: str
    #: what the unit took
    seconds: float
    #: seconds left for the rest (None: nothing measured yet)
    eta: float | None
    #: the best so far with its parameters
    best: str | None = None

    def status(self, best_last: bool = False) -> str:
        """The last unit's time, the best so far and the ETA, in one line (``best_last``: the best, the longest
        part, at the end, where a narrow terminal's bar cuts it short)."""
        parts = [f"last {duration_text(self.seconds)}"]
        eta_part = [f"ETA {duration_text(self.eta)}"] if self.eta is not None else []
        best = [f"best {self.best}"] if self.best else []
        return "  ·  ".join([*parts, *eta_part, *best] if best_last else [*parts, *best, *eta_part])

    def line(self) -> str:
        return f"[{self.done}/{self.total}] {self.what}  ·  {self.status()}"

    __str__ = line  # a script's ``progress=print`` prints the plain line


@dataclass
class Forecast:
    """What ``--dry-run`` prints: the plan (``lines``), the calibration and the estimated total in seconds."""

    lines: list[str]
    calibration: Calibration
    estimate: float
    #: how the estimate was made, in a line
    basis: str
    #: what the plan will not do as asked (a budget shorter than one trial), a line each
    warnings: list[str] = field(default_factory=list)


def estimate_runs(calibration: Calibration, epochs: Sequence[int], parallel: int = 1) -> float:
    """Seconds for trainings of ``epochs`` each at ``calibration``'s cost, ``parallel`` at a time (in rounds)."""
    if not epochs:
        return 0.0
    each = statistics.fmean(calibration.run_seconds(e) for e in epochs)
    return each * math.ceil(len(epochs) / max(1, parallel))
