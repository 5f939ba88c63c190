"""Search workers that survive each other, on Optuna's own machinery.

On an RDB storage (PostgreSQL, MySQL, SQLite) every running trial beats a heartbeat
(``--heartbeat`` seconds, Optuna's ``heartbeat_interval``).  A trial whose heartbeat is older
than twice that (Optuna's ``grace_period``) belonged to a worker that died: the next worker to
ask for a trial fails it, :class:`CloseAndRetry` ends its MLflow run (and its fold runs) KILLED
and queues the same parameters once more as a new trial.  ``--n-trials`` is the study's total of
finished (complete + pruned) trials across all workers: a worker stops asking once the finished and
running trials reach it (Optuna's ``MaxTrialsCallback``), and a trial that two racing workers asked
for over the total is failed unrun (:func:`over_total`: the lower trial numbers win; user attribute
``optiflow.over_n_trials``, left out of the summary), so the study never holds more; running the
same command on the same storage again continues toward the total.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna

from optiflow.errors import ServiceLost, first_line, redact

HEARTBEAT_SECONDS = 15
RUN_ATTR = "mlflow_run_id"
#: the study's user attribute naming its parent MLflow run (:func:`optiflow.search.study.shared_parent_run`)
PARENT_ATTR = "optiflow.mlflow_parent_run_id"
#: a trial's user attribute naming the finished runs it reused instead of training (its folds' with --cv)
REUSED_ATTR = "reused_run_ids"
FINISHED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
MAX_RETRY = 1
#: a trial's user attribute: asked for once the study already held ``--n-trials`` finished or running trials
OVER_ATTR = "optiflow.over_n_trials"
COUNTED_STATES = (*FINISHED_STATES, optuna.trial.TrialState.RUNNING)


def heartbeat_options(seconds: int, tracking_uri: str | None) -> dict[str, Any]:
    """``RDBStorage`` keyword arguments for heartbeats every ``seconds`` (none when 0).

    Optuna 4.9 renamed ``failed_trial_callback`` to ``heartbeat_stale_trial_callback``; this passes
    whichever the installed Optuna has.
    """
    if not seconds:
        return {}
    parameters = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    key = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in parameters else "failed_trial_callback"
    grace = 2 * int(seconds)
    return {"heartbeat_interval": int(seconds), "grace_period": grace, key: CloseAndRetry(tracking_uri, grace)}


class CloseAndRetry:
    """Optuna's stale-trial callback: end the dead trial's MLflow runs KILLED, then retry it once."""

    def __init__(self, tracking_uri: str | None, grace: int) -> None:
        self.tracking_uri = tracking_uri
        self.grace = grace
        factory = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        factory = factory or optuna.storages.RetryFailedTrialCallback
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = factory(max_retry=MAX_RETRY)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        reason = (f"the worker running trial {trial.number} stopped: no heartbeat for {self.grace} s "
                  f"(its trial is retried once with the same parameters)")
        # The recorded run and the runs found by tags: a retried trial inherits the user attributes of the trial
        # it retries (Optuna's retry copies them), the run id included, until its own run is recorded.
        recorded = trial.user_attrs.get(RUN_ATTR)
        for dead in dict.fromkeys([*([recorded] if recorded else []),
                                   *trial_runs(self.tracking_uri, study, trial.number)]):
            close_runs(self.tracking_uri, dead, reason)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry(study, trial)


def trial_runs(tracking_uri: str | None, study: optuna.Study, number: int) -> list[str]:
    """The RUNNING runs of trial ``number`` under the study's parent run, found by their tags: a worker killed
    between opening its trial's run and recording it on the trial (:data:`RUN_ATTR`) left only those (a retried
    trial then still holds the run id of the trial it retries)."""
    from optiflow.tracking import client, resolve_tracking_uri, retry

    parent_id = study.user_attrs.get(PARENT_ATTR)
    if not parent_id:
        return []
    store = client(resolve_tracking_uri(tracking_uri))
    parent = retry(store.get_run, parent_id)
    query = f"{trial_runs_filter(parent_id, number)} and attributes.status = 'RUNNING'"
    return [run.info.run_id for run in retry(store.search_runs, [parent.info.experiment_id], query)]


def trial_runs_filter(parent_id: str, number: int | str) -> str:
    """MLflow's search filter for the runs of trial ``number`` under the study's parent run ``parent_id``."""
    return f"tags.mlflow.parentRunId = '{parent_id}' and tags.`optuna.trial_number` = '{number}'"


def close_runs(tracking_uri: str | None, run_id: str, reason: str) -> None:
    """End run ``run_id`` and its still-running child runs KILLED with a ``failure`` tag saying ``reason``."""
    from mlflow.entities import RunTag

    from optiflow.tracking import client, resolve_tracking_uri, retry

    store = client(resolve_tracking_uri(tracking_uri))
    run = retry(store.get_run, run_id)
    children = retry(store.search_runs, [run.info.experiment_id],
                     f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'")
    for dead in [*children, run]:
        if dead.info.status == "RUNNING":
            retry(store.log_batch, dead.info.run_id, tags=[RunTag("failure", reason)])
            retry(store.set_terminated, dead.info.run_id, status="KILLED")


def finished(study: optuna.Study) -> int:
    """Trials that count toward ``--n-trials``: complete and pruned, by every worker."""
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


def total_callback(n_trials: int) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    """Stops this worker's ``optimize`` once the study holds ``n_trials`` finished or running trials."""
    return optuna.study.MaxTrialsCallback(n_trials, states=COUNTED_STATES)


def over_total(study: optuna.Study, trial: optuna.Trial, n_trials: int) -> bool:
    """Whether the trials numbered before ``trial`` that finished or still run already reach ``n_trials``: then
    ``trial`` (asked for by a worker racing another) is marked :data:`OVER_ATTR`, to be failed unrun."""
    counted = [t for t in study.get_trials(deepcopy=False, states=COUNTED_STATES) if t.number < trial.number]
    if len(counted) < n_trials:
        return False
    trial.set_user_attr(OVER_ATTR, True)
    trial.set_user_attr("failure", f"not run: the study already holds --n-trials {n_trials} trials")
    return True


def heartbeat_interval(study: optuna.Study) -> int | None:
    """The study storage's heartbeat interval in seconds (None: the storage beats none, e.g. a journal file)."""
    interval = getattr(study._storage, "get_heartbeat_interval", None)
    return interval() if callable(interval) else None


def settle(study: optuna.Study, run_queued: Callable[[int], bool | None],
           progress: Callable[[str], Any] | None) -> None:
    """After this worker's trials: fail the trials of dead workers, run their retries, and wait (at most
    a grace period and a beat) for the trials other workers hold, so that the worker that returns with no
    trial RUNNING is the one that finishes the study (refit, parent run ended).  ``run_queued`` returning
    False (the study stopped: its target reached, its budget spent) leaves the retries queued."""
    interval = heartbeat_interval(study)
    if interval is None:
        return
    deadline: float | None = None
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        queued = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
        if queued and run_queued(queued) is not False:
            deadline = None
            continue
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if not running:
            return
        if deadline is None:
            wait = 3 * interval
            deadline = time.monotonic() + wait
            if progress is not None:
                held = ", ".join(str(t.number) for t in running)
                progress(f"waiting up to {wait} s for trial {held} held by another worker (heartbeat {interval} s)")
        if time.monotonic() > deadline:
            return  # their workers are alive and beating: the last of them finishes the study
        time.sleep(min(1.0, interval / 2))


def storage_lost(exc: BaseException, url: str | None) -> ServiceLost | None:
    """The one-line error for a study database that stopped answering mid-search (None for other errors)."""
    reason = None
    seen: BaseException | None = exc
    while seen is not None:
        module = type(seen).__module__
        if module.startswith("mlflow"):
            return None  # the tracking store's own database: not the study's
        if module.startswith(("sqlalchemy", "psycopg", "sqlite3", "pymysql")) or isinstance(
                seen, optuna.exceptions.StorageInternalError):
            reason = seen
        seen = seen.__cause__ or seen.__context__
    if reason is None:
        return None
    text = first_line(getattr(reason, "orig", None) or reason)
    return ServiceLost(f"lost the study storage {redact(url or 'in memory')}: {text}")
