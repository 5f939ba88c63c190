"""A run's bookkeeping on a SQL store in two transactions (opened with its params and opening tags, ended with its
last metrics and its status): the same run, name, tags, params, metrics, steps, timestamps and status as the
client writes one by one, RUNNING while it trains, and the client's path wherever the bulk one does not apply."""

from __future__ import annotations

import itertools
import math
import time

import pytest
from mlflow.exceptions import MlflowException
from sqlalchemy import event

from optiflow import bulkwrite
from optiflow.search import objective
from optiflow.tracking import Tracker, client
from test_bulkwrite import PER_RUN_TAGS, _timings_dropped, logged
from test_search import TINY


def one_by_one(patched: pytest.MonkeyPatch) -> None:
    """The bulk writes do not apply (as on a tracking server): the client writes."""
    patched.setattr(bulkwrite, "sql_store", lambda mlflow_client: None)


def commits(tracking_uri: str) -> list[int]:
    """A counter of the write transactions committed to the store while it is listened to (``[n]``)."""
    count = [0]
    event.listen(client(tracking_uri)._tracking_client.store.engine, "commit", lambda _: count.__setitem__(0, count[0] + 1))
    return count


def trial_like(tracking_uri: str, experiment: str, parent_id: str, run_name: str | None = "trial 3",
               params: int = 40) -> tuple[str, list[tuple[str, float, int, int]]]:
    """A run written as a CV trial's (params queued before it opens, per-fold scores and per-epoch means, the
    last ones queued for its end), with NaN, infinities and an older step after a newer one;
    returns its id and the metrics as queued (key, value, timestamp, step)."""
    tracker = Tracker(tracking_uri, experiment)
    tracker.log_params({**{f"param_{i}": f"value {i}" for i in range(params)}, "cv_folds": 3}, flush=False)
    tracker.start(run_name=run_name, tags={"optiflow.kind": "cross-validation"}, parent_run_id=parent_id)
    for fold in range(3):
        tracker.log_metrics({"cv_val_accuracy": 0.9 + fold / 100}, step=fold + 1, flush=False)
    for index, epoch in enumerate((1, 2, 3, 2)):
        tracker.log_metrics({"val_loss": 1 / (index + 1), "grad_norm": math.inf, "lr": math.nan}, step=epoch,
                            flush=False)
    tracker.log_metrics({"cv_val_accuracy_mean": 0.91, "cv_val_accuracy_std": 0.01}, flush=False)
    queued = tracker.queued()
    tracker.end()
    return str(tracker.run_id), queued


def _parent(tracking_uri: str, experiment: str) -> str:
    parent = Tracker(tracking_uri, experiment)
    parent.start("parent")
    return str(parent.run_id)


@pytest.mark.parametrize("run_name, params, bulk", [("trial 3", 40, True), (None, 40, False), ("trial 3", 101, False)])
def test_a_trial_run_in_two_transactions_logs_what_the_client_logs_one_by_one(tracking_uri, experiment, mlflow_client,
                                                                             run_name, params, bulk):
    """Written in bulk (two transactions), or by the client where a run has no name (MLflow names it) or more params
    than one batch holds: the same run as the client's one by one, metric timestamps as queued, within its start
    and end."""
    parent_id = _parent(tracking_uri, experiment)
    with pytest.MonkeyPatch.context() as patched:
        one_by_one(patched)
        expected_id, _ = trial_like(tracking_uri, experiment, parent_id, run_name, params)
    counted = commits(tracking_uri)
    written_id, queued = trial_like(tracking_uri, experiment, parent_id, run_name, params)
    assert counted[0] == 2 if bulk else counted[0] > 2
    expected, written = logged(mlflow_client, expected_id), logged(mlflow_client, written_id)
    if run_name is None:  # MLflow gave each a random name
        assert written["name"] and expected["name"] and written["tags"].pop("mlflow.runName") == written.pop("name")
        expected["tags"].pop("mlflow.runName"), expected.pop("name")
    assert written == expected
    assert written["status"] == "FINISHED" and len(written["params"]) == params + 1
    assert sorted(written["histories"]["val_loss"]) == [(1, 1.0), (2, 0.25), (2, 0.5), (3, 1 / 3)]
    assert written["latest"]["val_loss"] == 1 / 3 and written["latest"]["lr"] == "nan"
    run = mlflow_client.get_run(written_id)
    assert run.data.tags["mlflow.parentRunId"] == parent_id and PER_RUN_TAGS <= set(run.data.tags)
    stored = {(m.key, m.timestamp, m.step) for key in run.data.metrics
              for m in mlflow_client.get_metric_history(written_id, key)}
    assert stored == {(key, timestamp, step) for key, _, timestamp, step in queued}  # each when it was logged
    assert all(run.info.start_time <= timestamp <= run.info.end_time for _, timestamp, _ in stored)


def test_ending_with_a_metric_already_in_the_run_goes_through_the_client_and_still_ends_it(
        tracking_uri, experiment, mlflow_client, monkeypatch):
    tracker = Tracker(tracking_uri, experiment)
    tracker.start("trial")
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)  # two identical rows: the second is in the run
    tracker.log_metrics({"loss": 0.5}, step=1)
    tracker.log_metrics({"loss": 0.5}, step=1, flush=False)
    tracker.log_metrics({"loss": 0.25}, step=2, flush=False)
    tracker.end("KILLED")
    run = mlflow_client.get_run(tracker.run_id)
    assert (run.info.status, run.info.end_time) == ("KILLED", 1_700_000_000_000)
    assert [(m.step, m.value) for m in mlflow_client.get_metric_history(tracker.run_id, "loss")] == [
        (1, 0.5), (2, 0.25)]


def test_a_run_ends_in_one_transaction_even_when_its_store_write_fails_midway(tracking_uri, experiment,
                                                                              mlflow_client, monkeypatch):
    """The last metrics and the end are all or nothing: a failure in between leaves the run RUNNING without
    them, then the client ends it (as before: a flush that fails still ends the run) and the error is raised."""
    tracker = Tracker(tracking_uri, experiment)
    tracker.start("trial")
    tracker.log_metrics({"loss": 0.5}, step=1, flush=False)

    def failing(*args):
        raise RuntimeError("disk gone midway")

    monkeypatch.setattr(bulkwrite, "_insert_metrics", failing)
    seen = []
    real = tracker.client.set_terminated
    monkeypatch.setattr(tracker.client, "set_terminated", lambda run_id, **k: (
        seen.append(mlflow_client.get_run(run_id).info.status), real(run_id, **k)))
    with pytest.raises(MlflowException, match="disk gone midway"):
        tracker.end()
    assert seen == ["RUNNING"] and mlflow_client.get_run(tracker.run_id).info.status == "FINISHED"


def _search(invoke, tracking_uri, mlflow_client, experiment, patch=None) -> dict[str, dict]:
    """A 2-trial x 2-fold search; its trial runs (by name) as ``logged`` holds them, without timings."""
    with pytest.MonkeyPatch.context() as patched:
        if patch is not None:
            patch(patched)
        result = invoke("search", "--space", "lr=choice:0.01,0.001", "--sampler", "grid", "--cv", "2",
                        "--epochs", "2", *TINY, "--tracking-uri", tracking_uri, "--experiment", experiment, store=False)
    assert result.exit_code == 0, result.stderr
    runs = mlflow_client.search_runs([mlflow_client.get_experiment_by_name(experiment).experiment_id])
    trials = {run.info.run_name: run.info.run_id for run in runs if run.data.tags.get("optiflow.kind") == "cross-validation"}
    assert sorted(trials) == ["trial 0", "trial 1"]
    found = {}
    for name, run_id in trials.items():
        [found[name]] = _timings_dropped([logged(mlflow_client, run_id)])
        for tag in ("optuna.study_name", "optiflow.command"):
            found[name]["tags"].pop(tag)
    return found


def test_a_searchs_trial_runs_log_what_they_logged_through_the_client(invoke, tracking_uri, mlflow_client,
                                                                      experiment):
    """A real CV search: each trial's run (params, tags, per-fold scores, per-epoch means, status) as the client
    writes it one by one; in bulk the client creates and ends no run of the search."""
    def in_bulk(patched):
        creating = client(tracking_uri)
        for name in ("create_run", "set_terminated"):
            patched.setattr(creating, name, lambda *a, _name=name, **k: pytest.fail(f"the client's {_name}"))

    expected = _search(invoke, tracking_uri, mlflow_client, experiment, one_by_one)
    written = _search(invoke, tracking_uri, mlflow_client, experiment + "-bulk", in_bulk)
    assert written == expected
    assert all(run["status"] == "FINISHED" and run["params"]["cv_folds"] == "2" for run in written.values())
    assert all(len(run["histories"]["cv_val_loss"]) == 2 and "cv_val_loss_mean" in run["latest"]
               for run in written.values())


def test_a_trial_run_is_running_with_its_params_and_heartbeat_while_its_folds_train(invoke, mlflow_client, experiment,
                                                                                   monkeypatch):
    """Progress, claims and ``optiflow runs --stale`` see the trial's run RUNNING, not ended, its params and
    heartbeat already there, while its folds train."""
    seen = []
    train_folds = objective.train_folds

    def watching(configs, parent_run_id, **kwargs):
        run = mlflow_client.get_run(parent_run_id)
        seen.append((run.info.status, run.info.end_time, run.data.params.get("cv_folds"),
                     "optiflow.heartbeat" in run.data.tags, run.data.metrics))
        return train_folds(configs, parent_run_id=parent_run_id, **kwargs)

    monkeypatch.setattr(objective, "train_folds", watching)
    result = invoke("search", "--space", "lr=choice:0.01", "--sampler", "grid", "--cv", "2", "--epochs", "1", *TINY)
    assert result.exit_code == 0, result.stderr
    assert seen == [("RUNNING", None, "2", True, {})]


@pytest.mark.slow
def test_on_postgresql_a_trial_run_in_two_transactions_logs_what_the_client_logs():
    """The same on a PostgreSQL store (MLflow's SqlAlchemyStore there too)."""
    import shutil
    import tempfile
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from services import start_postgres

    root = Path(tempfile.mkdtemp(prefix="optiflow-pg-"))
    postgres = start_postgres(root, databases=("mlflow",))
    try:
        uri = postgres.url("mlflow")
        mlflow_client = MlflowClient(uri)
        parent_id = _parent(uri, "on-postgres")
        with pytest.MonkeyPatch.context() as patched:
            one_by_one(patched)
            expected_id, _ = trial_like(uri, "on-postgres", parent_id)
        counted = commits(uri)
        written_id, _ = trial_like(uri, "on-postgres", parent_id)
        assert counted[0] == 2
        assert logged(mlflow_client, written_id) == logged(mlflow_client, expected_id)
        assert mlflow_client.get_run(written_id).info.status == "FINISHED"
    finally:
        postgres.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_every_run_of_a_cv_search_has_its_metrics_stamped_between_its_start_and_end(invoke, tracking_uri,
                                                                                  mlflow_client, experiment,
                                                                                  monkeypatch):
    """The parent, trial and fold runs: no metric is stamped after its run ended (the folds' end was read before
    their test metrics were stamped).  The clock moves 2 ms each time it is read, so a read out of order shows."""
    real, reads = time.time, itertools.count()
    monkeypatch.setattr(time, "time", lambda: real() + next(reads) * 0.002)
    result = invoke("search", "--space", "lr=choice:0.01", "--sampler", "grid", "--cv", "2", "--epochs", "1", *TINY,
                    "--tracking-uri", tracking_uri, "--experiment", experiment, store=False)
    assert result.exit_code == 0, result.stderr
    runs = mlflow_client.search_runs([mlflow_client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1 + 1 + 2  # the search, its trial, the trial's folds
    outside = [(run.info.run_name, key, metric.timestamp - run.info.end_time)
               for run in runs for key in run.data.metrics
               for metric in mlflow_client.get_metric_history(run.info.run_id, key)
               if not run.info.start_time <= metric.timestamp <= run.info.end_time]
    assert outside == []


def test_a_training_has_its_test_metrics_written_while_its_model_is_exported(invoke, mlflow_client, experiment,
                                                                           monkeypatch):
    """The model's export takes seconds (and the most memory): a process killed or out of memory there keeps
    the test metrics it computed before."""
    from optiflow import export

    seen = []
    log_model = export.log_model

    def watching(run, ahead=None):
        stored = mlflow_client.get_run(run.tracker.run_id)
        seen.append((stored.info.status, sorted(key for key in stored.data.metrics if key.startswith("test_"))))
        return log_model(run, ahead)

    monkeypatch.setattr(export, "log_model", watching)
    result = invoke("train", "--epochs", "1", "--model", "mlp:hidden=[16]", "--batch-size", "64", "-q")
    assert result.exit_code == 0, result.stderr
    assert seen == [("RUNNING", ["test_accuracy", "test_loss"])]
