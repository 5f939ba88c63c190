"""``optiflow runs --stale``: the RUNNING runs whose process is gone, and closing them KILLED.

A parent run (a search's, a comparison's, a cross-validated trial's) is stale only when its own
heartbeat says its process is gone *and* none of its RUNNING descendants may still be training:
another search worker keeps it alive. A RUNNING child of a stale parent that carries no heartbeat of
its own (written before optiflow beat at creation) is stale with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from optiflow import heartbeat
from optiflow.tracking import client, resolve_tracking_uri, retry

if TYPE_CHECKING:
    from mlflow.entities import Run

PARENT_TAG = "mlflow.parentRunId"


def stale_runs(tracking_uri: str | None) -> list[tuple[Run, str]]:
    """``(run, why its process is gone)`` for every stale RUNNING run of every experiment in the store,
    parents before their children."""
    running = _running(tracking_uri)
    children: dict[str, list[Run]] = {}
    for run in running:
        children.setdefault(run.data.tags.get(PARENT_TAG, ""), []).append(run)
    reasons = {run.info.run_id: heartbeat.gone(run.data.tags) for run in running}

    def alive_below(run_id: str) -> bool:
        return any(reasons[child.info.run_id] is None and heartbeat.TAG in child.data.tags
                   or alive_below(child.info.run_id) for child in children.get(run_id, []))

    found: list[tuple[Run, str]] = []
    seen: set[str] = set()

    def visit(run: Run, inherited: str | None) -> None:
        run_id = run.info.run_id
        if run_id in seen:
            return
        seen.add(run_id)
        reason = reasons[run_id]
        if reason is None and inherited is not None and heartbeat.TAG not in run.data.tags:
            reason = inherited
        if reason is not None and not alive_below(run_id):
            found.append((run, reason))
            inherited = f"its parent run's process is gone ({reason})"
        else:
            inherited = None
        for child in children.get(run_id, []):
            visit(child, inherited)

    ids = set(reasons)
    for run in running:
        if run.data.tags.get(PARENT_TAG) not in ids:
            visit(run, None)
    return found


def close_run(tracking_uri: str | None, run_id: str, reason: str) -> None:
    """End a stale run KILLED, saying why; what it logged (and its checkpoint) stays."""
    store = client(resolve_tracking_uri(tracking_uri, existing=True))
    retry(store.set_tag, run_id, "failure", f"the process training it was gone ({reason}); closed by optiflow runs")
    retry(store.set_terminated, run_id, "KILLED")


def _running(tracking_uri: str | None) -> list[Run]:
    """Every RUNNING run of every experiment in the store."""
    from mlflow.entities import ViewType

    store = client(resolve_tracking_uri(tracking_uri, existing=True))
    experiments = [e.experiment_id for e in retry(store.search_experiments, view_type=ViewType.ALL)]
    found: list[Run] = []
    for start in range(0, len(experiments), 100):
        found += retry(store.search_runs, experiments[start:start + 100], "attributes.status = 'RUNNING'",
                       run_view_type=ViewType.ALL, max_results=50000)
    return found
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

    uri = resolve_tracking_uri(tracking_uri, existing=True)
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
    found: list[Run] = []
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
