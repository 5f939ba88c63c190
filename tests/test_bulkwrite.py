"""Runs written to a SQL store in bulk (optiflow.bulkwrite): exactly the rows MLflow's client writes one by one,
all or nothing, and the client's own path wherever the bulk one does not apply."""

from __future__ import annotations

import math

import pytest
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from optiflow import bulkwrite
from optiflow.search.folds import train_folds
from optiflow.tracking import Tracker, client
from test_stacked import fold_configs, parent

#: tags whose values differ between two runs of the same training: when and by which process, under which parent
PER_RUN_TAGS = {"optiflow.heartbeat", "mlflow.parentRunId"}


def logged(mlflow_client, run_id: str) -> dict:
    """Everything MLflow holds for run ``run_id`` that does not depend on its id or on the clock."""
    run = mlflow_client.get_run(run_id)
    histories = {key: [(m.step, m.value if not math.isnan(m.value) else "nan")
                       for m in mlflow_client.get_metric_history(run_id, key)] for key in run.data.metrics}
    return {"name": run.info.run_name, "status": run.info.status, "user": run.info.user_id,
            "stage": run.info.lifecycle_stage, "params": run.data.params, "latest": _nan(run.data.metrics),
            "tags": {k: v for k, v in run.data.tags.items() if k not in PER_RUN_TAGS}, "histories": histories,
            "artifacts": run.info.artifact_uri.endswith(f"/{run_id}/artifacts"),
            "ended": run.info.end_time is not None and run.info.end_time >= run.info.start_time}


def _nan(metrics: dict[str, float]) -> dict[str, object]:
    return {k: "nan" if math.isnan(v) else v for k, v in metrics.items()}


def _timings_dropped(runs: list[dict]) -> list[dict]:
    """The runs with the metrics that measure time (not the same twice) left out."""
    timings = {"epoch_time", "samples_per_sec", "train_seconds"}
    for run in runs:
        for part in ("latest", "histories"):
            run[part] = {k: v for k, v in run[part].items() if k not in timings}
    return runs


def _stacked(tracking_uri: str, experiment: str, mlflow_client, patch=None) -> list[dict]:
    """Three folds trained stacked and logged under a new parent run, ``patch(monkeypatch)`` applied meanwhile."""
    configs = fold_configs(tracking_uri, experiment, folds=3)
    parent_id = parent(mlflow_client, experiment)
    with pytest.MonkeyPatch.context() as patched:
        if patch is not None:
            patch(patched)
        results = train_folds(configs, parent_run_id=parent_id, tags=[{"optiflow.cv_fold": str(k)} for k in range(3)],
                              params={"optuna.trial_number": 4})
    assert results is not None
    for result in results:
        assert mlflow_client.get_run(result.run_id).data.tags["mlflow.parentRunId"] == parent_id
    return _timings_dropped([logged(mlflow_client, result.run_id) for result in results])


def test_folds_written_in_one_transaction_log_what_the_one_by_one_path_logs(tracking_uri, experiment, mlflow_client):
    def one_by_one(patched):
        patched.setattr(bulkwrite, "sql_store", lambda mlflow_client: None)  # as on a tracking server

    def in_bulk(patched):
        creating = client(tracking_uri)
        patched.setattr(creating, "create_run", lambda *a, **k: pytest.fail("a fold run was created by the client"))
        patched.setattr(creating, "log_batch", lambda *a, **k: pytest.fail("a fold run was logged by the client"))

    expected = _stacked(tracking_uri, experiment, mlflow_client, one_by_one)
    written = _stacked(tracking_uri, experiment, mlflow_client, in_bulk)
    assert written == expected
    assert [run["name"] for run in written] == ["fold 0", "fold 1", "fold 2"]
    assert all(len(run["histories"]["val_accuracy"]) == 3 and run["status"] == "FINISHED" for run in written)


def test_folds_are_written_all_or_none(tracking_uri, experiment, mlflow_client):
    """A write that fails at the second fold's metrics leaves no fold run, not one of three."""
    insert = bulkwrite._insert_metrics
    calls = []

    def failing(store, session, run_id, metrics):
        calls.append(run_id)
        if len(calls) == 2:
            raise MlflowException("disk I/O error")
        insert(store, session, run_id, metrics)

    with pytest.raises(MlflowException, match="disk I/O error"):
        _stacked(tracking_uri, experiment, mlflow_client, lambda patched: patched.setattr(
            bulkwrite, "_insert_metrics", failing))
    experiment_id = mlflow_client.get_experiment_by_name(experiment).experiment_id
    runs = mlflow_client.search_runs([experiment_id])
    assert [run.info.run_name for run in runs] == ["trial"], "the parent alone"


BATCH = [Metric("loss", 0.5, 1000, 1), Metric("loss", 0.25, 1000, 2), Metric("loss", 0.25, 1000, 2),
         Metric("loss", float("nan"), 1001, 3), Metric("loss", float("nan"), 1001, 3), Metric("acc", float("inf"), 5, 0),
         Metric("acc", 0.9, 1001, 3), Metric("acc", 0.8, 1002, 3), Metric("grad_norm/fc1", -math.inf, 7, 2)]


def _run(tracking_uri: str, experiment: str) -> Tracker:
    tracker = Tracker(tracking_uri, experiment)
    tracker.start("metrics")
    return tracker


@pytest.mark.parametrize("batches, bulk", [
    ([BATCH], [True]),
    ([BATCH[:4], BATCH[4:]], [True, False]),  # the second repeats a NaN row of the first: the client skips it
    ([BATCH[5:], BATCH[:5]], [True, True]),
])
def test_a_metric_batch_in_one_statement_stores_what_the_client_stores(tracking_uri, experiment, mlflow_client,
                                                                       batches, bulk):
    """Duplicates in a batch, NaN, infinities and an older step after a newer one: the same rows and the same
    latest values either way (as Tracker.flush writes: in one statement, else through the client)."""
    by_client, in_bulk = _run(tracking_uri, experiment), _run(tracking_uri, experiment)
    for batch, expected in zip(batches, bulk):
        mlflow_client.log_batch(by_client.run_id, metrics=batch)
        assert bulkwrite.log_batch(in_bulk.client, in_bulk.run_id, batch) is expected
        if not expected:
            mlflow_client.log_batch(in_bulk.run_id, metrics=batch)
    stored = [logged(mlflow_client, tracker.run_id) for tracker in (by_client, in_bulk)]
    assert stored[0] == stored[1]
    assert stored[1]["latest"] == {"loss": "nan", "acc": 0.8, "grad_norm/fc1": -1.7976931348623157e308}
    assert stored[1]["histories"]["loss"] == [(1, 0.5), (2, 0.25), (3, "nan")]


def test_a_metric_already_stored_goes_through_the_client(tracking_uri, experiment, mlflow_client):
    tracker = _run(tracking_uri, experiment)
    assert bulkwrite.log_batch(tracker.client, tracker.run_id, BATCH[:2])
    assert not bulkwrite.log_batch(tracker.client, tracker.run_id, BATCH[1:3]), "the row is there already"
    tracker.log_metrics({"loss": 0.25}, step=2)  # the tracker's flush then writes through the client
    tracker.log_metrics({"loss": 0.1}, step=4)
    assert [(m.step, m.value) for m in mlflow_client.get_metric_history(tracker.run_id, "loss")] == [
        (1, 0.5), (2, 0.25), (2, 0.25), (4, 0.1)]


@pytest.mark.parametrize("metric, message", [
    (Metric("a//b", 1.0, 1, 1), "Invalid value"),
    (Metric("ok", "high", 1, 1), "valid double"),  # type: ignore[arg-type]
])
def test_a_bad_metric_is_refused_as_the_client_refuses_it(tracking_uri, experiment, mlflow_client, metric, message):
    tracker = _run(tracking_uri, experiment)
    with pytest.raises(MlflowException, match=message):
        mlflow_client.log_batch(tracker.run_id, metrics=[metric])
    with pytest.raises(MlflowException, match=message):
        bulkwrite.log_batch(tracker.client, tracker.run_id, [Metric("fine", 1.0, 1, 1), metric])
    assert mlflow_client.get_run(tracker.run_id).data.metrics == {}, "nothing of the refused batch"


def test_a_deleted_run_takes_no_more_metrics(tracking_uri, experiment, mlflow_client):
    tracker = _run(tracking_uri, experiment)
    mlflow_client.delete_run(tracker.run_id)
    with pytest.raises(MlflowException, match="must be in the 'active' state"):
        mlflow_client.log_batch(tracker.run_id, metrics=BATCH[:1])
    with pytest.raises(MlflowException, match="must be in the 'active' state"):
        bulkwrite.log_batch(tracker.client, tracker.run_id, BATCH[:1])
