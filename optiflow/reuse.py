"""A finished run is never trained twice: the FINISHED run of the same experiment and store holding a run's
content key (:mod:`optiflow.runkey`) is returned instead of training it again, when it holds what the command
would log (:data:`OUTPUTS_TAG`); parents name what they reused (:func:`reused_tags`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from optiflow import distributed
from optiflow.config import RunConfig
from optiflow.plan import plan
from optiflow.registry import Registry
from optiflow.run import RunResult, dataset_digest, load_source
from optiflow.runkey import KEY_TAG, run_key
from optiflow.setup import resolve_device

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

#: what a run logs besides its parameters and metrics (:func:`outputs`): a reused run holds at least what was asked
OUTPUTS_TAG = "optiflow.outputs"
#: on a parent run: how many of its runs or trials were reused, and which runs they reused
REUSED_TAG = "optiflow.reused"
REUSED_RUNS_TAG = "optiflow.reused_runs"
#: the longest tag value written (some MLflow stores keep 5000 characters)
MAX_TAG = 5000
#: candidates read per key (the same key held by more finished runs than this: the newest are enough)
CANDIDATES = 100


def outputs(*, artifacts: bool, log_model: bool, config: RunConfig) -> set[str]:
    """What a run logs besides its parameters and metrics: figures and files, its model, every step's loss."""
    return {name for name, wanted in (("artifacts", artifacts), ("model", log_model),
                                      ("step_loss", config.log_step_loss)) if wanted}


def key_tags(key: str, held: set[str]) -> dict[str, str]:
    """The tags a run opens with: its key and what it logs (:func:`outputs`)."""
    return {KEY_TAG: key, OUTPUTS_TAG: ",".join(sorted(held)) or "-"}


def finished_run(config: RunConfig, key: str, needed: set[str] | None = None) -> RunResult | None:
    """The newest FINISHED run of ``config``'s experiment and store holding ``key`` and at least ``needed``
    (:func:`outputs`), read back as the :class:`RunResult` its training returned, with ``reused`` set; None when
    there is none (a deleted run is none)."""
    from optiflow.tracking import client, resolve_tracking_uri, retry

    uri = resolve_tracking_uri(config.tracking_uri)
    store = client(uri)
    experiment = retry(store.get_experiment_by_name, config.experiment)
    if experiment is None or experiment.lifecycle_stage != "active":
        return None
    query = f"tags.`{KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'"
    for run in retry(store.search_runs, [experiment.experiment_id], query, max_results=CANDIDATES,
                     order_by=["attributes.start_time DESC"]):
        if (needed or set()) <= set(run.data.tags.get(OUTPUTS_TAG, "").split(",")):
            return _result(store, run, uri)
    return None


def _result(store: MlflowClient, run: Run, uri: str) -> RunResult:
    """A finished run as its training returned it: its test metrics and every per-epoch metric's history."""
    from optiflow.tracking import retry

    metrics = run.data.metrics
    tested = {key: value for key, value in metrics.items() if key.startswith("test_")}
    history = {}
    for key in sorted(set(metrics) - set(tested) - {"train_seconds"}):
        if key.endswith("_step"):
            continue
        steps = retry(store.get_metric_history, run.info.run_id, key)
        history[key] = [m.value for m in sorted(steps, key=lambda m: (m.step, m.timestamp))]
    return RunResult(run.info.run_id, tested, history, len(history.get("train_loss", [])),
                     float(metrics.get("train_seconds", 0.0)), uri, run.data.tags.get("stopped_early"), reused=True)


def reused_tags(reused: dict[str, str], total: int, what: str = "runs") -> dict[str, str]:
    """A parent run's tags naming what it reused, ``{label: run id}`` of ``total`` runs or trials: ``6 of 10 runs``
    and ``opt=sgd seed=0: <run id>; ...``."""
    listed = "; ".join(f"{label}: {run_id}" for label, run_id in reused.items())
    if len(listed) > MAX_TAG:
        listed = listed[:MAX_TAG - 40].rpartition("; ")[0] + "; ... (every one is in the runs table)"
    return {REUSED_TAG: f"{len(reused)} of {total} {what}", REUSED_RUNS_TAG: listed or "-"}


def planned_key(config: RunConfig, registry: Registry) -> str:
    """The content key :func:`prepare` gives a run of ``config``, from its plan, data (the :func:`shared_data` cache
    when one is open) and device alone: a search looks its folds up before it trains any."""
    resolved = plan(config, registry)
    cluster = distributed.current()
    device = resolve_device(config.device, cluster.local_rank if cluster.enabled else None)
    return run_key(resolved, dataset_digest(load_source(resolved, config)), device, cluster.world_size)


def finished_in_store(configs: list[RunConfig], needed: set[str], registry: Registry) -> list[str | None]:
    """For ``--dry-run``: the FINISHED run each of ``configs`` would reuse (its id, None: it would train), read
    without creating anything: a store that does not exist yet (its SQLite file or folder) holds none."""
    import os

    from optiflow.stores import is_server, sqlite_path
    from optiflow.tracking import DEFAULT_TRACKING_URI

    uri = configs[0].tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI if configs else ""
    path = Path(uri.removeprefix("file://").removeprefix("file:")) if uri.startswith("file:") else (
        sqlite_path(uri) if "://" in uri else Path(uri))
    if not configs or (path is not None and not is_server(uri) and not path.exists()):
        return [None] * len(configs)
    found = [finished_run(config, planned_key(config, registry), needed) for config in configs]
    return [result.run_id if result is not None else None for result in found]
