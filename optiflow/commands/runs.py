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
