"""Runs and metrics written to a SQL tracking store (SQLite, PostgreSQL, MySQL) in one transaction, through
MLflow's own store: its session maker, table models and checks.

MLflow's client writes a run in four transactions (create, params, metrics, status) and builds an ORM object
per metric row: about 70 ms for a fold run of 400 metric rows.  :func:`write_finished` writes the finished
runs a search trains together (its stacked folds) in one transaction, and :func:`log_batch` inserts a batch
of metrics in one statement: the rows are those MLflow's client writes (runs, tags, params, metrics, latest
metrics), only written in bulk.  Both return False where they do not apply (a tracking server, an active
MLflow model, a metric already in the store): the caller then writes through the client as before.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from sqlalchemy.orm import Session


@dataclass
class FinishedRun:
    """One run to write finished (or RUNNING, to open it): its name, tags (as its tracker opens runs), params and
    metrics."""

    name: str
    tags: Mapping[str, str]
    params: Sequence[Param] = ()
    metrics: Sequence[Metric] = ()
    status: str = "FINISHED"
    #: the run's id once written
    run_id: str | None = field(default=None, init=False)


def sql_store(mlflow_client: MlflowClient) -> SqlAlchemyStore | None:
    """The client's MLflow ``SqlAlchemyStore``; None for a tracking server or another store, and while an
    MLflow model is active (MLflow's client then logs each metric to that model too)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking.fluent import get_active_model_id

    store = getattr(getattr(mlflow_client, "_tracking_client", None), "store", None)
    return store if isinstance(store, SqlAlchemyStore) and get_active_model_id() is None else None


def write_finished(mlflow_client: MlflowClient, experiment_id: str, runs: Sequence[FinishedRun], started_ms: int,
                   ended_ms: int | None) -> bool:
    """Create ``runs`` in experiment ``experiment_id``, started at ``started_ms`` and ended at ``ended_ms``
    (None: not ended, for a RUNNING run) with their status, each with its tags, params and metrics, in one
    transaction (none is written unless all are); sets each one's ``run_id``.  False (nothing written) where
    the store is no SQL store."""
    from mlflow.entities import ViewType
    from mlflow.store.tracking.dbmodels.models import SqlParam, SqlRun, SqlTag
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
    from mlflow.utils.validation import _validate_param, _validate_param_keys_unique
    from sqlalchemy import insert

    store = sql_store(mlflow_client)
    if store is None:
        return False
    rows: dict[Any, list[dict[str, Any]]] = {SqlRun: [], SqlTag: [], SqlParam: []}
    written: list[tuple[str, FinishedRun, dict[str, str]]] = []
    for run in runs:
        _validate_param_keys_unique(run.params)
        params = [_validate_param(p.key, p.value, path=f"params[{i}]") for i, p in enumerate(run.params)]
        run_id = uuid.uuid4().hex
        tags = {MLFLOW_RUN_NAME: run.name, **run.tags}
        rows[SqlTag] += [dict(run_uuid=run_id, key=k, value=v) for k, v in tags.items()]
        rows[SqlParam] += [dict(run_uuid=run_id, key=p.key, value=p.value) for p in params]
        written.append((run_id, run, tags))
    with store.ManagedSessionMaker(read_only=False) as session:
        # the experiment read in the writing transaction, without its tags (MLflow's get_experiment reads them)
        experiment = store._get_experiment(session, experiment_id, ViewType.ALL)
        store._check_experiment_is_active(experiment)
        rows[SqlRun] = [_run_row(store, experiment, run_id, tags, run.status, started_ms, ended_ms)
                        for run_id, run, tags in written]
        for model, values in rows.items():
            if values:
                session.execute(insert(model), values)
        for run_id, run, _ in written:
            _insert_metrics(store, session, run_id, run.metrics)
    for run_id, run, _ in written:
        run.run_id = run_id
    return True


def _run_row(store: SqlAlchemyStore, experiment: Any, run_id: str, tags: Mapping[str, str], status: str,
             started_ms: int, ended_ms: int | None) -> dict[str, Any]:
    """The ``runs`` row of run ``run_id`` with ``tags`` (its name among them) in ``experiment`` (an
    ``SqlExperiment``), as MLflow's ``create_run`` fills it (then ``set_terminated`` for an ended one)."""
    from mlflow.entities import RunStatus, SourceType
    from mlflow.entities.lifecycle_stage import LifecycleStage
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, MLFLOW_USER
    from mlflow.utils.uri import append_to_uri_path

    return dict(
        name=tags[MLFLOW_RUN_NAME], run_uuid=run_id, experiment_id=int(experiment.experiment_id),
        artifact_uri=append_to_uri_path(experiment.artifact_location, run_id, store.ARTIFACTS_FOLDER_NAME),
        source_type=SourceType.to_string(SourceType.UNKNOWN), source_name="", entry_point_name="",
        user_id=tags.get(MLFLOW_USER, "unknown"), status=RunStatus.to_string(RunStatus.from_string(status)),
        start_time=started_ms, end_time=ended_ms, deleted_time=None, source_version="",
        lifecycle_stage=LifecycleStage.ACTIVE)


def log_batch(mlflow_client: MlflowClient, run_id: str, metrics: Sequence[Metric],
              end: tuple[str, int] | None = None) -> bool:
    """Insert ``metrics`` into the open run ``run_id`` in one statement and update its latest metrics, as
    MLflow's ``log_batch`` would, and with ``end`` = (status, end time in ms) end the run in the same
    transaction, as MLflow's ``set_terminated`` would; False (nothing written) where the store is no SQL store
    or a metric of the batch is already in the run (MLflow's client then skips those it holds)."""
    from mlflow.entities import RunStatus
    from sqlalchemy.exc import IntegrityError

    store = sql_store(mlflow_client)
    if store is None or not (metrics or end):
        return False
    try:
        with store.ManagedSessionMaker(read_only=False) as session:
            run = store._get_run(run_uuid=run_id, session=session)
            store._check_run_is_active(run)
            _insert_metrics(store, session, run_id, metrics)
            if end is not None:
                run.status, run.end_time = RunStatus.to_string(RunStatus.from_string(end[0])), end[1]
    except Exception as exc:  # ManagedSessionMaker wraps the store's errors in an MlflowException
        if isinstance(exc, IntegrityError) or isinstance(exc.__cause__, IntegrityError):
            return False
        raise
    return True


def _insert_metrics(store: SqlAlchemyStore, session: Session, run_id: str, metrics: Sequence[Metric]) -> None:
    """``metrics`` of run ``run_id`` checked and stored as MLflow's ``_log_metrics`` stores them (NaN and
    infinities made storable, a row logged twice in the batch once), and the run's latest metrics updated."""
    from mlflow.store.tracking.dbmodels.models import SqlMetric
    from sqlalchemy import insert

    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    latest: dict[str, dict[str, Any]] = {}
    checked: set[str] = set()
    for index, metric in enumerate(metrics):
        _check_metric(metric, checked, "" if len(metrics) == 1 else f"metrics[{index}]")
        is_nan, value = store.sanitize_metric_value(metric.value)
        identity = (metric.key, metric.timestamp, metric.step, value, is_nan)
        if identity in rows:
            continue
        row = rows[identity] = dict(run_uuid=run_id, key=metric.key, value=value, timestamp=metric.timestamp,
                                    step=metric.step, is_nan=is_nan)
        newest = latest.get(metric.key)
        if newest is None or (metric.step, metric.timestamp, value) > (newest["step"], newest["timestamp"],
                                                                        newest["value"]):
            latest[metric.key] = row
    if not rows:
        return
    session.execute(insert(SqlMetric.__table__), list(rows.values()))
    # MLflow's own update, given the newest row of each key in the batch (the one its pass over the batch keeps)
    store._update_latest_metrics_if_necessary([SimpleNamespace(**row) for row in latest.values()], session)


def _check_metric(metric: Metric, checked: set[str], path: str) -> None:
    """MLflow's check of a metric (``_validate_metric``), run in full for the first metric of each key and for
    any whose value, timestamp or step is not a plain number; the others pass it by construction."""
    from mlflow.utils.validation import _validate_metric

    plain = (type(metric.value) in (float, int) and type(metric.timestamp) is int and metric.timestamp >= 0
             and type(metric.step) is int)
    if metric.key not in checked or not plain:
        _validate_metric(metric.key, metric.value, metric.timestamp, metric.step, path=path)
        checked.add(metric.key)
