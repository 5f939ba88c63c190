"""MLflow tracking (optiflow/tracking.py): run_status ends every run with the right status, the
project-local default store, and concurrent processes sharing one store."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from optiflow import bulkwrite
from optiflow.errors import RunKilled, first_line
from optiflow.tracking import DEFAULT_TRACKING_URI, Tracker, run_status, ui_command

from helpers import metric_history, run_cli

CONCURRENT_PROCESSES = 4


class FakeTracker:
    def __init__(self):
        self.tags: dict[str, str] = {}
        self.ended: list[str] = []

    def set_tags(self, tags):
        self.tags.update(tags)

    def end(self, status):
        self.ended.append(status)


def test_run_status_finishes_a_block_that_completes():
    tracker = FakeTracker()
    with run_status(tracker):
        pass
    assert tracker.ended == ["FINISHED"] and "failure" not in tracker.tags


@pytest.mark.parametrize("error, status", [
    (RuntimeError("boom\ntrace"), "FAILED"), (KeyboardInterrupt(), "KILLED"), (RunKilled("pruned"), "KILLED"),
])
def test_run_status_ends_a_raising_block_with_the_status_its_error_means(error, status):
    tracker = FakeTracker()
    with pytest.raises(type(error)):
        with run_status(tracker):
            raise error
    assert tracker.ended == [status]
    if isinstance(error, RunKilled):
        assert "failure" not in tracker.tags
    else:
        assert tracker.tags["failure"] == first_line(error)


def test_run_status_lets_the_block_choose_the_status_or_leave_the_run_open():
    tracker = FakeTracker()
    with run_status(tracker) as outcome:
        outcome.status = "FAILED"
    with run_status(tracker) as outcome:
        outcome.status = None
    with pytest.raises(ValueError), run_status(tracker) as outcome:
        outcome.failure = "the reason the caller knows"
        raise ValueError("internal")
    assert tracker.ended == ["FAILED", "FAILED"]
    assert tracker.tags["failure"] == "the reason the caller knows"


def test_run_status_ends_real_mlflow_runs_as_the_store_shows(tracking_uri, experiment, mlflow_client):
    def opened() -> Tracker:
        tracker = Tracker(tracking_uri, experiment)
        tracker.start()
        return tracker

    completed, failed, killed, left_open = opened(), opened(), opened(), opened()
    with run_status(completed):
        completed.log_metrics({"queued": 1.0}, step=1, flush=False)
    with pytest.raises(RuntimeError), run_status(failed):
        raise RuntimeError("boom\ntrace")
    with pytest.raises(KeyboardInterrupt), run_status(killed):
        raise KeyboardInterrupt
    with run_status(left_open) as outcome:
        outcome.status = None

    def stored(tracker):
        return mlflow_client.get_run(tracker.run_id)

    assert stored(completed).info.status == "FINISHED" and "failure" not in stored(completed).data.tags
    assert stored(completed).data.metrics["queued"] == 1.0, "ending the run flushes the queued metrics"
    assert stored(failed).info.status == "FAILED" and stored(failed).data.tags["failure"] == "boom"
    assert stored(killed).info.status == "KILLED" and stored(killed).data.tags["failure"] == "KeyboardInterrupt"
    assert stored(left_open).info.status == "RUNNING"


def test_default_store_is_project_local_and_created_without_mlflow_chatter(tmp_path):
    proc = run_cli("train", "--epochs", "1", "-q", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    assert list((tmp_path / "mlruns" / "artifacts").glob("optiflow/*/artifacts/config.yaml"))
    assert "Creating initial MLflow database tables" not in proc.stderr
    assert not [line for line in proc.stderr.splitlines() if " INFO " in line], proc.stderr


def test_the_ui_hint_of_a_tracking_server_is_its_url():
    assert ui_command("http://tracking.example:5000") == "http://tracking.example:5000"
    assert ui_command("https://mlflow.example.org/") == "https://mlflow.example.org/"
    assert ui_command("sqlite:///elsewhere.db") == "mlflow ui --backend-store-uri sqlite:///elsewhere.db"
    assert ui_command(DEFAULT_TRACKING_URI) == "optiflow ui"


def test_ui_on_a_tracking_server_points_at_it_instead_of_serving_it(invoke, monkeypatch):
    monkeypatch.setattr(os, "execv", lambda *args: pytest.fail(f"started {args}"))
    result = invoke("ui", "--tracking-uri", "http://tracking.example:5000")
    assert result.exit_code == 0 and "MLflow UI: http://tracking.example:5000 " in result.stderr


@pytest.mark.slow
def test_concurrent_processes_on_a_fresh_project_store_lose_nothing(tmp_path):
    """Processes started at once race to create the SQLite store, the experiment and their runs."""
    from mlflow.tracking import MlflowClient

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "optiflow", "train", "--epochs", "3", "--model", "mlp:hidden=[16]", "-q",
             "--seed", str(index), "--run-name", f"p{index}"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for index in range(CONCURRENT_PROCESSES)
    ]
    outcomes = [(p.wait(timeout=400), p.stderr.read()) for p in processes]
    for code, stderr in outcomes:
        assert code == 0, stderr
        assert "locked" not in stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("optiflow").experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"p{i}" for i in range(CONCURRENT_PROCESSES)]
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
            assert [step for step, _ in metric_history(client, run.info.run_id, key)] == [1, 2, 3], (run.info.run_name, key)
        assert "test_accuracy" in run.data.metrics
        assert "learning_curves.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_short_epochs_share_one_metric_write_and_end_writes_the_rest(tracking_uri, experiment, mlflow_client,
                                                                      monkeypatch):
    tracker = Tracker(tracking_uri, experiment)
    tracker.start(run_name="batched")
    writes = []
    log_batch, in_bulk = tracker.client.log_batch, bulkwrite.log_batch  # a write goes through one of them
    monkeypatch.setattr(tracker.client, "log_batch", lambda *a, **k: (writes.append(1), log_batch(*a, **k))[1])
    monkeypatch.setattr(bulkwrite, "log_batch", lambda *a, **k: (writes.append(1), in_bulk(*a, **k))[1])
    for epoch in (1, 2, 3):
        tracker.log_metrics({"loss": 1.0 / epoch}, step=epoch, flush=False)
        tracker.flush_due(60.0)
    assert writes == [] and metric_history(mlflow_client, tracker.run_id, "loss") == []
    tracker.flush_due(0.0)
    assert len(writes) == 1 and [s for s, _ in metric_history(mlflow_client, tracker.run_id, "loss")] == [1, 2, 3]
    tracker.log_metrics({"loss": 0.1}, step=4, flush=False)
    tracker.end()
    assert [s for s, _ in metric_history(mlflow_client, tracker.run_id, "loss")] == [1, 2, 3, 4]


@pytest.mark.parametrize("text, shown", [
    ("postgresql+psycopg://optiflow:s3cret@db:5432/optuna", "postgresql+psycopg://optiflow:***@db:5432/optuna"),
    ("see http://alice:pw@mlflow:5000/x and sqlite:///m.db", "see http://alice:***@mlflow:5000/x and sqlite:///m.db"),
    ("postgresql://optiflow@db/optuna", "postgresql://optiflow@db/optuna"),
    ("https://mlflow.example:5000", "https://mlflow.example:5000"),
])
def test_redact_masks_the_password_of_every_url(text, shown):
    from optiflow.errors import redact

    assert redact(text) == shown
    assert first_line(RuntimeError(text)) == shown


def test_a_tracker_never_stores_a_password_in_params_tags_or_files(tracking_uri, experiment, mlflow_client, tmp_path):
    secret = "postgresql://optiflow:s3cret@db/optuna"
    tracker = Tracker(tracking_uri, experiment)
    run_id = tracker.start(run_name="r", tags={"optiflow.command": f"optiflow search --storage {secret}"})
    tracker.log_params({"storage": secret})
    tracker.set_tags({"note": secret})
    tracker.log_text(f"storage: {secret}\n", "config.yaml")
    tracker.end()
    run = mlflow_client.get_run(run_id)
    stored = [*run.data.params.values(), *run.data.tags.values()]
    stored.append(open(mlflow_client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read())
    assert not [text for text in stored if "s3cret" in text]
    assert run.data.params["storage"] == "postgresql://optiflow:***@db/optuna"


@pytest.mark.parametrize("bulk", [True, False])
def test_a_run_carries_its_heartbeat_from_the_call_that_creates_it(tracking_uri, experiment, mlflow_client,
                                                                    monkeypatch, bulk):
    """A process killed right after the run's creation (one transaction on a SQL store, else the client's
    create_run) still leaves a run whose heartbeat names it (no later write)."""
    import socket

    from mlflow.tracking import MlflowClient

    from optiflow import bulkwrite, heartbeat

    created = []
    original, write_finished = MlflowClient.create_run, bulkwrite.write_finished

    def record(self, *args, **kwargs):
        created.append(kwargs.get("tags", {}).get(heartbeat.TAG))
        return original(self, *args, **kwargs)

    def record_bulk(mlflow_client, experiment_id, runs, *args):
        created.extend(run.tags.get(heartbeat.TAG) for run in runs)
        return write_finished(mlflow_client, experiment_id, runs, *args)

    monkeypatch.setattr(MlflowClient, "create_run", record)
    monkeypatch.setattr(bulkwrite, "write_finished", record_bulk)
    if not bulk:
        monkeypatch.setattr(bulkwrite, "sql_store", lambda mlflow_client: None)  # as on a tracking server
    tracker = Tracker(tracking_uri, experiment)
    run_id = tracker.start(run_name="r")
    assert created[0] is not None and created[0].split(" ")[:2] == [socket.gethostname(), str(os.getpid())]
    assert mlflow_client.get_run(run_id).data.tags[heartbeat.TAG] == created[0]
    mlflow_client.set_terminated(run_id, "KILLED")
    mlflow_client.set_tag(run_id, heartbeat.TAG, "elsewhere 1 1000")
    tracker.start(run_id=run_id)  # a reopened run beats before it says RUNNING
    reopened = mlflow_client.get_run(run_id)
    assert reopened.info.status == "RUNNING" and reopened.data.tags[heartbeat.TAG].split(" ")[1] == str(os.getpid())
    tracker.end()


def test_beating_renews_the_heartbeat_while_the_block_runs_and_stops_after(tracking_uri, experiment, mlflow_client,
                                                                            monkeypatch):
    import time

    from optiflow import heartbeat

    monkeypatch.setenv(heartbeat.EVERY_ENV, "0.1")
    tracker = Tracker(tracking_uri, experiment)
    run_id = tracker.start()
    mlflow_client.set_tag(run_id, heartbeat.TAG, "elsewhere 1 1000")
    with heartbeat.beating(tracker):
        deadline = time.monotonic() + 20
        while mlflow_client.get_run(run_id).data.tags[heartbeat.TAG].startswith("elsewhere"):
            assert time.monotonic() < deadline, "no beat within 20 s"
            time.sleep(0.05)
    time.sleep(0.3)  # a beat already under way may still land
    mlflow_client.set_tag(run_id, heartbeat.TAG, "stopped 1 1000")
    time.sleep(0.4)
    assert mlflow_client.get_run(run_id).data.tags[heartbeat.TAG] == "stopped 1 1000"
    tracker.end()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_store_deleted_or_replaced_under_a_run_stops_its_next_write(tmp_path, experiment, how):
    """MLflow's open connection would go on writing into the unlinked file: the next write says so instead."""
    import shutil

    from optiflow.errors import StoreLost

    db = tmp_path / "mlflow.db"
    tracker = Tracker(f"sqlite:///{db}", experiment)
    tracker.start()
    tracker.log_metrics({"a": 1.0}, step=1)
    if how == "deleted":
        for path in tmp_path.glob("mlflow.db*"):
            path.unlink()
    else:
        shutil.copy(db, tmp_path / "other.db")
        os.replace(tmp_path / "other.db", db)
    tracker.log_metrics({"a": 2.0}, step=2, flush=False)
    with pytest.raises(StoreLost, match=f"the tracking store sqlite:///{db} was {how}"):
        tracker.flush()
    with pytest.raises(StoreLost):
        tracker.set_tags({"x": "y"})


def test_a_read_only_store_is_one_line(tmp_path, monkeypatch):
    """Where the store's lock file cannot be written (here: not permitted), one sentence, exit 2."""
    from optiflow import stores
    from optiflow.errors import OptiflowError

    def refuse(path, mode="r", *args, **kwargs):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(OptiflowError, match="cannot write to the tracking store .*: Read-only file system") as info:
        with stores.store_lock(tmp_path / "mlflow.db"):
            pass
    assert info.value.exit_code == 2


@pytest.mark.parametrize("name", ["OPTIFLOW_HEARTBEAT_SECONDS", "OPTIFLOW_CHECKPOINT_SECONDS", "OPTIFLOW_STALE_AFTER"])
@pytest.mark.parametrize("command", ["train", "compare", "search"])
def test_a_bad_seconds_setting_is_one_line_before_any_run_opens(invoke, mlflow_client, experiment, monkeypatch,
                                                                 name, command):
    from helpers import assert_no_run

    monkeypatch.setenv(name, "soon")
    extra = {"train": [], "compare": ["--vary", "lr=0.1,0.01"], "search": ["--space", "lr=choice:0.1", "--n-trials", "1"]}
    result = invoke(command, "--epochs", "1", "-q", *extra[command])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and lines == [f"Error: ${name} must be a number of seconds >= 0, got 'soon'"], \
        result.stderr
    assert_no_run(mlflow_client, experiment)
@pytest.mark.parametrize("bulk", [True, False])
def test_what_is_logged_before_a_run_opens_is_written_with_it_and_nothing_before(tracking_uri, experiment,
                                                                                  mlflow_client, monkeypatch, bulk):
    """Folds trained stacked log to a tracker whose run opens once they finish: start() is the one place a run
    is created, with the params, metrics and tags logged before it, at the time it was given (on a SQL store
    in one transaction and ended in another, else through the client)."""
    from optiflow import bulkwrite

    if not bulk:
        monkeypatch.setattr(bulkwrite, "sql_store", lambda mlflow_client: None)  # as on a tracking server
    tracker = Tracker(tracking_uri, experiment)
    calls = []
    for name in ("create_run", "log_batch", "set_terminated"):
        real = getattr(tracker.client, name)
        monkeypatch.setattr(tracker.client, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name),
                                                                                              _real(*a, **k))[1])
    tracker.log_metrics({"val_loss": 0.5}, step=1, flush=False)
    tracker.log_metrics({"val_loss": 0.25}, step=2)  # flush=True: still nothing to write to
    tracker.set_tags({"stopped_early": "patience"})
    tracker.log_params({"epochs": 2}, flush=False)
    assert calls == [] and tracker.run_id is None
    with pytest.raises(Exception, match="no MLflow run is open"):
        tracker.log_text("x", "x.txt")
    parent = mlflow_client.create_run(mlflow_client.get_experiment_by_name(experiment).experiment_id).info.run_id
    run_id = tracker.start("fold 0", {"optiflow.cv_fold": "0"}, parent_run_id=parent, started_ms=1_000)
    tracker.end("FINISHED", ended_ms=2_000)
    assert calls == ([] if bulk else ["create_run", "log_batch", "set_terminated"])
    run = mlflow_client.get_run(run_id)
    assert (run.info.start_time, run.info.end_time, run.info.status) == (1_000, 2_000, "FINISHED")
    assert run.data.params == {"epochs": "2"}
    assert [v for _, v in metric_history(mlflow_client, run_id, "val_loss")] == [0.5, 0.25]
    assert run.data.tags["stopped_early"] == "patience" and run.data.tags["optiflow.cv_fold"] == "0"
    assert run.data.tags["mlflow.parentRunId"] == parent
    host, pid, _ = run.data.tags["optiflow.heartbeat"].split(" ")
    assert pid == str(os.getpid()), "a deferred run beats from the call that creates it too"


def test_every_run_is_tagged_with_the_optiflow_version_and_the_command(tracking_uri, experiment, mlflow_client,
                                                                        monkeypatch):
    import optiflow
    from optiflow import tracking

    monkeypatch.setattr(sys, "argv", ["/usr/bin/optiflow", "search", "--n-trials", "3"])
    tracker = Tracker(tracking_uri, experiment)
    tags = mlflow_client.get_run(tracker.start("python caller")).data.tags
    assert tags["optiflow.version"] == optiflow.__version__
    assert tags["optiflow.command"] == "optiflow search --n-trials 3"
    monkeypatch.setattr(tracking, "CLI_ARGS", ["compare", "--vary", "lr=0.1,0.01"])
    tags = mlflow_client.get_run(Tracker(tracking_uri, experiment).start("cli")).data.tags
    assert tags["optiflow.command"] == "optiflow compare --vary lr=0.1,0.01"
    given = {"optiflow.command": "optiflow train --epochs 1"}
    tags = mlflow_client.get_run(Tracker(tracking_uri, experiment).start("given", given)).data.tags
    assert tags["optiflow.command"] == "optiflow train --epochs 1", "a tag the caller gives wins"


def test_the_cli_command_line_does_not_outlive_the_command(invoke):
    from optiflow import tracking

    result = invoke("train", "--epochs", "1", "--print-config")
    assert result.exit_code == 0, result.output
    assert tracking.CLI_ARGS is None, "a Python caller later in this process would be tagged with that command"


@pytest.mark.parametrize("tracker_class", ["Tracker", "NullTracker"])
def test_both_trackers_implement_every_member_of_the_run_tracker_protocol(tracker_class):
    """What mypy checks where a tracker is assigned to Run.tracker, checked here on the classes themselves:
    NullTracker answers every call with a real method (no __getattr__ that would hide a typo)."""
    import inspect

    from optiflow import runlog, tracking
    from optiflow.runlog import RunTracker

    cls = getattr(tracking, tracker_class, None) or getattr(runlog, tracker_class)
    members = {name for name in vars(RunTracker) if not name.startswith("_")}
    assert members >= {"run_id", "log_metrics", "set_tags", "log_text", "end"}
    for name in members - {"run_id", "uri"}:
        assert inspect.signature(getattr(cls, name)) == inspect.signature(getattr(RunTracker, name)), name
    assert not hasattr(cls, "__getattr__")
    with pytest.raises(AttributeError):
        runlog.NullTracker().log_metric({"x": 1})  # a typo is an error, not silently ignored


def test_tags_set_before_a_run_is_reopened_land_on_it(tracking_uri, experiment, mlflow_client):
    first = Tracker(tracking_uri, experiment)
    run_id = first.start("to resume")
    first.end("KILLED")
    again = Tracker(tracking_uri, experiment)
    again.set_tags({"optiflow.resumed_from_epoch": 3})
    assert again.start(run_id=run_id) == run_id
    run = mlflow_client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["optiflow.resumed_from_epoch"] == "3"


def test_the_store_commits_without_waiting_for_the_disk_and_other_databases_keep_sqlites_default(tmp_path):
    """The MLflow store (WAL) commits with synchronous=NORMAL (1) on every new connection, the client's own
    included on a store it just created (the connections that created its tables, before WAL, are closed); a
    database in another journal mode, as an Optuna study's, keeps FULL (2).  Run in a fresh process: the hook is
    process-wide."""
    script = f"""
import sqlalchemy
from optiflow.tracking import client, resolve_tracking_uri
uri = resolve_tracking_uri("sqlite:///{tmp_path}/mlruns/mlflow.db")
client(uri).search_experiments()
store = sqlalchemy.create_engine(uri)
other = sqlalchemy.create_engine("sqlite:///{tmp_path}/study.db")
with store.connect() as a, other.connect() as b, client(uri)._tracking_client.store.engine.connect() as c:
    print(a.exec_driver_sql("PRAGMA journal_mode").scalar(), a.exec_driver_sql("PRAGMA synchronous").scalar(),
          b.exec_driver_sql("PRAGMA journal_mode").scalar(), b.exec_driver_sql("PRAGMA synchronous").scalar(),
          c.exec_driver_sql("PRAGMA synchronous").scalar())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert done.stdout.split() == ["wal", "1", "delete", "2", "1"]
