"""The K folds of a cross-validated trial trained at once as one stacked model (:mod:`optiflow.stacked`), then
logged as the K child runs the run-by-run path makes: same parameters, per-epoch and test metrics.

Used when nothing watches the folds while they train (no pruner, no ``--child-artifacts``, no
``--log-models``); :func:`train_folds` returns None when the folds cannot be stacked or anything goes wrong
while training them (a diverging fold, a plugin raising, a hook stopping one fold early), and the trial then
trains its folds one by one, which fails, stops or logs exactly as before.
"""

from __future__ import annotations

import time
from typing import Any

from optiflow.config import RunConfig
from optiflow.run import RunResult

#: the tag saying a fold run was trained stacked with its trial's other folds (the value is how many)
STACKED_TAG = "optiflow.stacked_folds"


class Recorder:
    """Stands in for a run's tracker while it trains stacked: keeps metrics and tags for the real run."""

    run_id = None
    uri = None

    def __init__(self) -> None:
        self.metrics: list[Any] = []
        self.tags: dict[str, str] = {}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, flush: bool = True) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.metrics.extend(Metric(key, float(value), now, step or 0) for key, value in metrics.items()
                            if isinstance(value, (int, float)) and not isinstance(value, bool))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.tags.update({key: str(value) for key, value in tags.items()})

    def flush(self) -> None: ...

    def flush_due(self, seconds: float) -> None: ...


def train_folds(configs: list[RunConfig], *, parent_run_id: str, tags: list[dict[str, str]],
                params: dict[str, Any]) -> list[RunResult] | None:
    """Train the folds ``configs`` stacked and log each as a child run of ``parent_run_id`` with its
    ``tags`` and ``params``; None (nothing logged) when they cannot be trained stacked."""
    from optiflow import digest, host
    from optiflow.commands.train import data_digest, default_run_name, run_tags, setup_params
    from optiflow.errors import OptiflowError
    from optiflow.loop import evaluate
    from optiflow.plugins import get_plugin_manager, get_registry
    from optiflow.run import prepare
    from optiflow.stacked import fit_stacked, why_not_stacked
    from optiflow.tracking import Tracker

    registry, pm = get_registry(), get_plugin_manager()
    try:
        runs = [prepare(config, registry) for config in configs]
    except OptiflowError:
        return None
    if why_not_stacked(runs, pm) is not None:
        return None
    recorders = [Recorder() for _ in runs]
    started_ms = int(time.time() * 1000)
    started = time.perf_counter()
    tests = []
    try:
        with host.threads(runs[0].setup.threads), host.deterministic(configs[0].deterministic):
            for run, recorder in zip(runs, recorders):
                run.artifacts = False
                pm.hook.optiflow_check_run(run=run)
                run.tracker = recorder
                pm.hook.optiflow_run_start(run=run)
            fit_stacked(runs, pm)
            for run in runs:
                run.status = "FINISHED"
                pm.hook.optiflow_run_end(run=run, status="FINISHED")
                tests.append(evaluate(run, run.splits.x_test, run.splits.y_test, "test"))
    except Exception:  # any failure: the folds train one by one, which reports it as it always did
        return None
    seconds = time.perf_counter() - started
    ended_ms = int(time.time() * 1000)
    results = []
    for run, recorder, test, fold_tags in zip(runs, recorders, tests, tags):
        recorder.log_metrics(test, step=run.epoch)
        recorder.log_metrics({"train_seconds": seconds}, step=run.epoch)
        tracker = Tracker(run.config.tracking_uri, run.config.experiment)
        run_id = tracker.log_finished(
            run.config.run_name or default_run_name(run),
            {**run_tags(fold_tags), **recorder.tags, STACKED_TAG: str(len(runs)),
             digest.WEIGHTS_TAG: digest.weights_digest(run.model), digest.DATA_TAG: data_digest(run)}, parent_run_id,
            setup_params(run, params), recorder.metrics, started_ms, ended_ms)
        results.append(RunResult(run_id, test, run.history, run.epoch, seconds, tracker.uri, run.stop_reason))
    return results
