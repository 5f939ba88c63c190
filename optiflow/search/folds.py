"""The K folds of a cross-validated trial trained at once as one stacked model (:mod:`optiflow.stacked`), then
logged as the K child runs the run-by-run path makes: same parameters, per-epoch and test metrics.

Used when nothing watches the folds while they train (no pruner, no ``--child-artifacts``, no
``--log-models``).  :func:`train_folds` is the one way in: it returns None, before any hook is called, when
:func:`optiflow.stacked.why_not_stacked` says the folds cannot be stacked (the trial then trains them one by
one); once they train stacked, whatever stops them (a diverging fold, a plugin raising, Ctrl-C) is raised as
the run-by-run path would raise it, and no fold run is logged.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

from optiflow.config import RunConfig
from optiflow.run import Run, RunResult

if TYPE_CHECKING:
    from optiflow.plugins import PluginManager
    from optiflow.tracking import Tracker

#: the tag saying a fold run was trained stacked with its trial's other folds (the value is how many)
STACKED_TAG = "optiflow.stacked_folds"


def train_folds(configs: list[RunConfig], *, parent_run_id: str, tags: list[dict[str, str]],
                params: dict[str, Any]) -> list[RunResult] | None:
    """Train the folds ``configs`` stacked and log each as a child run of ``parent_run_id`` with its
    ``tags`` and ``params``; None (nothing run, nothing logged) when they cannot be trained stacked."""
    from optiflow import host
    from optiflow.plugins import get_plugin_manager, get_registry
    from optiflow.run import prepare
    from optiflow.stacked import fit_stacked, why_not_stacked
    from optiflow.tracking import Tracker
    from optiflow.training import end_run, training_error

    registry, pm = get_registry(), get_plugin_manager()
    runs = [prepare(configs[0], registry)]
    with host.threads(runs[0].setup.threads):  # the threads its folds train with: a small model's one thread
        runs += [prepare(config, registry) for config in configs[1:]]  # spares each fold's tiny kernels a wait
    if why_not_stacked(runs, pm) is not None:
        return None
    first = Tracker(configs[0].tracking_uri, configs[0].experiment)  # the folds share their store and experiment
    trackers = [first, *(first.sibling() for _ in runs[1:])]  # each opens its run once they are trained
    started_ms = int(time.time() * 1000)
    started = time.perf_counter()
    try:
        with host.threads(runs[0].setup.threads), host.deterministic(configs[0].deterministic):
            for run, tracker in zip(runs, trackers):
                run.role, run.wants_artifacts = "cv-fold", False
                pm.hook.optiflow_check_run(run=run)
                run.tracker = tracker
                pm.hook.optiflow_run_start(run=run)
            fit_stacked(runs, pm)
            tests = [end_run(run, pm) for run in runs]
    except BaseException as exc:
        _end_unfinished(runs, pm, exc)
        error = training_error(pm, exc, f"the {len(runs)} folds trained stacked; no fold run was logged") \
            if isinstance(exc, Exception) else exc
        if error is exc:
            raise
        raise error from exc
    return _log_folds(runs, trackers, tests, tags, params, parent_run_id, started_ms, time.perf_counter() - started)


def _end_unfinished(runs: list[Run], pm: PluginManager, exc: BaseException) -> None:
    """``optiflow_run_end`` for every started run that did not finish, as a failed training calls it."""
    status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
    for run in runs:
        if run.tracker is not None and run.status is None:
            run.status = status
            with contextlib.suppress(Exception):
                pm.hook.optiflow_run_end(run=run, status=status)


def _log_folds(runs: list[Run], trackers: list[Tracker], tests: list[dict[str, float]], tags: list[dict[str, str]],
               params: dict[str, Any], parent_run_id: str, started_ms: int, seconds: float) -> list[RunResult]:
    """Each fold as a finished child run of ``parent_run_id``, opened with what its tracker kept while the
    folds trained: all in one transaction on a SQL store (:func:`optiflow.tracking.log_finished`)."""
    from optiflow import digest
    from optiflow.reuse import key_tags, outputs
    from optiflow.tracking import log_finished
    from optiflow.training import data_digest, default_run_name, setup_params

    for run, tracker, test in zip(runs, trackers, tests):
        tracker.log_metrics({**test, "train_seconds": seconds}, step=run.epoch, flush=False)
        tracker.log_params(setup_params(run, params), flush=False)
    ended_ms = int(time.time() * 1000)  # read after the metrics were stamped: none lies after its run's end
    fold_tags = [{**fold_tags, STACKED_TAG: str(len(runs)), digest.WEIGHTS_TAG: digest.weights_digest(run.model),
                  digest.DATA_TAG: data_digest(run),
                  **key_tags(run.key, outputs(artifacts=False, log_model=False, config=run.config))}
                 for run, fold_tags in zip(runs, tags)]
    log_finished(trackers, [run.config.run_name or default_run_name(run) for run in runs], fold_tags, parent_run_id,
                 started_ms, ended_ms)
    return [RunResult(tracker.run_id, test, run.history, run.epoch, seconds, tracker.uri, run.stop_reason)
            for run, tracker, test in zip(runs, trackers, tests)]
