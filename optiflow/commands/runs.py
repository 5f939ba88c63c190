"""``optiflow runs --stale``: the RUNNING runs whose process is gone, and closing them KILLED."""

from __future__ import annotations

from typing import Any

from optiflow import heartbeat
from optiflow.tracking import client, resolve_tracking_uri, retry


def stale_runs(tracking_uri: str | None) -> list[tuple[Any, str]]:
    """``(run, why its process is gone)`` for every RUNNING run of every experiment in the store."""
    from mlflow.entities import ViewType

    store = client(resolve_tracking_uri(tracking_uri))
    experiments = [e.experiment_id for e in retry(store.search_experiments, view_type=ViewType.ALL)]
    found = []
    for start in range(0, len(experiments), 100):
        for run in retry(store.search_runs, experiments[start:start + 100], "attributes.status = 'RUNNING'",
                         run_view_type=ViewType.ALL, max_results=50000):
            reason = heartbeat.gone(run.data.tags)
            if reason is not None:
                found.append((run, reason))
    return found


def close_run(tracking_uri: str | None, run_id: str, reason: str) -> None:
    """End a stale run KILLED, saying why; what it logged (and its checkpoint) stays."""
    store = client(resolve_tracking_uri(tracking_uri))
    retry(store.set_tag, run_id, "failure", f"the process training it was gone ({reason}); closed by optiflow runs")
    retry(store.set_terminated, run_id, "KILLED")


#: the metrics ``optiflow runs`` shows in its table, in this order, where a run has them
KEY_METRICS = ("test_accuracy", "test_rmse", "test_loss", "val_accuracy", "val_loss")
STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED", "SCHEDULED")


def list_runs(tracking_uri: str | None, *, experiment: str | None = None, status: str | None = None,
              limit: int = 50) -> list[dict[str, Any]]:
    """The newest ``limit`` runs of the store (of ``experiment``, with ``status``), one JSON-ready record each:
    id, experiment, name, status, start, parent, kind and final metrics.  An unknown experiment is refused."""
    import datetime
    import difflib

    from mlflow.entities import ViewType

    from optiflow.errors import OptiflowError

    uri = resolve_tracking_uri(tracking_uri)
    store = client(uri)
    experiments = {e.experiment_id: e.name for e in retry(store.search_experiments, view_type=ViewType.ALL)}
    if experiment is not None:
        if experiment not in experiments.values():
            close = difflib.get_close_matches(experiment, list(experiments.values()), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise OptiflowError(f"no experiment '{experiment}' in {uri}{hint}; "
                                f"it has {', '.join(sorted(experiments.values())) or 'none'}")
        experiments = {k: v for k, v in experiments.items() if v == experiment}
    where = f"attributes.status = '{status}'" if status else ""
    found: list[Any] = []
    ids = list(experiments)
    for start in range(0, len(ids), 100):
        found += retry(store.search_runs, ids[start:start + 100], where, run_view_type=ViewType.ACTIVE_ONLY,
                       max_results=limit, order_by=["attributes.start_time DESC"])
    found.sort(key=lambda run: run.info.start_time or 0, reverse=True)
    return [{
        "run_id": run.info.run_id,
        "experiment": experiments[run.info.experiment_id],
        "name": run.info.run_name,
        "status": run.info.status,
        "start_time": datetime.datetime.fromtimestamp((run.info.start_time or 0) / 1000, datetime.timezone.utc)
        .isoformat(timespec="seconds"),
        "parent_run_id": run.data.tags.get("mlflow.parentRunId"),
        "kind": run.data.tags.get("optiflow.kind", "train"),
        "metrics": dict(sorted(run.data.metrics.items())),
    } for run in found[:limit]]
