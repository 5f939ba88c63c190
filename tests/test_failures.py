"""Runs that do not finish: plugin exceptions, SIGINT/SIGTERM, the checkpoint they leave, and resuming from it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from optiflow import hookimpl
from optiflow.commands.train import resume_config, train
from optiflow.config import RunConfig
from optiflow.errors import PluginError, RunInterrupted
from optiflow.plugins import get_plugin_manager

from helpers import metric_history, runs_of

SMALL = {"model": "mlp:hidden=[16]", "batch_size": 64}
EXACT = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")


class RaiseAt:
    """A plugin that raises ``exc`` in its epoch-end hook at ``epoch``."""

    def __init__(self, exc: BaseException, epoch: int) -> None:
        self.exc, self.epoch = exc, epoch

    @hookimpl
    def optiflow_epoch_end(self, run, epoch, metrics):
        if epoch == self.epoch:
            raise self.exc


def config(tracking_uri, experiment, **values) -> RunConfig:
    return RunConfig.from_dict({**SMALL, "tracking_uri": tracking_uri, "experiment": experiment, **values})


def test_plugin_exception_fails_the_run_naming_the_plugin(tracking_uri, experiment, mlflow_client, plugin):
    plugin(RaiseAt(ValueError("cannot compute the thing"), epoch=2), "flaky-plugin")
    with pytest.raises(PluginError, match="plugin 'flaky-plugin' failed in optiflow_epoch_end: ValueError") as info:
        train(config(tracking_uri, experiment, epochs=3))
    assert info.value.plugin == "flaky-plugin"
    [run] = runs_of(mlflow_client, experiment)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure"].startswith("plugin 'flaky-plugin' failed in optiflow_epoch_end")
    assert [step for step, _ in metric_history(mlflow_client, run.info.run_id, "train_loss")] == [1]
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
    assert {"failure.txt", "checkpoint", "config.yaml"} <= artifacts
    trace = mlflow_client.download_artifacts(run.info.run_id, "failure.txt")
    assert "cannot compute the thing" in open(trace).read()


def test_regularizer_exception_names_the_regularizer(tracking_uri, experiment, mlflow_client, monkeypatch):
    from optiflow_plugins.regularizers import L2Penalty

    def broken(self, run):
        raise RuntimeError("penalty exploded")

    monkeypatch.setattr(L2Penalty, "optiflow_penalty", hookimpl(broken))
    with pytest.raises(PluginError, match="plugin 'regularizers' failed in regularizer 'l2' \\(optiflow_penalty\\): RuntimeError: penalty"):
        train(config(tracking_uri, experiment, epochs=2, reg=["l2"]))
    [run] = runs_of(mlflow_client, experiment)
    assert run.info.status == "FAILED"


def test_plugin_failure_on_the_cli_is_one_line(invoke, plugin, mlflow_client, experiment):
    plugin(RaiseAt(RuntimeError("boom\nsecond line"), epoch=1), "cli-flaky")
    result = invoke("train", "--epochs", "2", *("--model", "mlp:hidden=[16]"))
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: plugin 'cli-flaky' failed in optiflow_epoch_end: RuntimeError: boom")
    assert "Traceback" not in result.output
    [run] = runs_of(mlflow_client, experiment)
    assert run.info.status == "FAILED"


def test_interrupted_run_resumes_to_the_same_metrics_as_an_uninterrupted_one(
    tracking_uri, experiment, mlflow_client, plugin, invoke
):
    """Dropout, shuffling, a step schedule and early stopping all keep state that the checkpoint must carry over."""
    # lr is best at epoch 1 (the step schedule halves it at 3): early stopping's count of epochs
    # without improvement must go on 2, 3 after the resume, and its best weights stay epoch 1's
    values = dict(epochs=4, seed=7, opt="sgd:momentum=0.9", sched="step:step_size=2,gamma=0.5",
                  model="mlp:hidden=[32],dropout=0.3", batch_size=32,
                  reg=["early-stopping:monitor=lr,mode=max,patience=10"])
    straight = train(config(tracking_uri, experiment, run_name="straight", **values))

    plugin(RaiseAt(RunInterrupted(signal.SIGTERM), epoch=3), "interrupt-at-3")
    with pytest.raises(RunInterrupted, match="ended KILLED; checkpoint of epoch 2 saved") as info:
        train(config(tracking_uri, experiment, run_name="interrupted", **values))
    assert info.value.exit_code == 143
    get_plugin_manager().unregister(name="interrupt-at-3")
    interrupted = next(r for r in runs_of(mlflow_client, experiment) if r.info.run_name == "interrupted")
    run_id = interrupted.info.run_id
    assert interrupted.info.status == "KILLED"
    assert interrupted.data.tags["failure"] == "interrupted by SIGTERM"
    assert [step for step, _ in metric_history(mlflow_client, run_id, "val_loss")] == [1, 2]

    result = invoke("train", "--resume", run_id, "--tracking-uri", tracking_uri, "-q", store=False)
    assert result.exit_code == 0, result.output

    runs = runs_of(mlflow_client, experiment)
    assert len(runs) == 2, "resuming continues the same MLflow run"
    resumed = mlflow_client.get_run(run_id)
    assert resumed.info.status == "FINISHED"
    assert "failure" not in resumed.data.tags
    assert resumed.data.tags["optiflow.resumed_from_epoch"] == "2"
    for key in EXACT:
        assert metric_history(mlflow_client, run_id, key) == metric_history(mlflow_client, straight.run_id, key), key
    assert [wait for _, wait in metric_history(mlflow_client, run_id, "early_stopping_wait")] == [0, 1, 2, 3]
    assert resumed.data.tags["early_stopping.restored_epoch"] == "1"
    for key in ("test_loss", "test_accuracy"):
        assert resumed.data.metrics[key] == straight.metrics[key]
    import mlflow.pytorch

    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_resume_refuses_a_finished_run(tracking_uri, experiment):
    done = train(config(tracking_uri, experiment, epochs=1), log_model=False)
    from optiflow.errors import OptiflowError

    with pytest.raises(OptiflowError, match="already FINISHED"):
        resume_config(done.run_id, tracking_uri)


def test_checkpoints_load_with_weights_only(tracking_uri, experiment, mlflow_client, plugin):
    plugin(RaiseAt(RunInterrupted(), epoch=2), "interrupt-at-2")
    with pytest.raises(RunInterrupted):
        train(config(tracking_uri, experiment, epochs=3))
    [run] = runs_of(mlflow_client, experiment)
    path = mlflow_client.download_artifacts(run.info.run_id, "checkpoint/last.pt")
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 1 and state["format"] == 1
    assert set(state["rng"]) >= {"torch", "batches", "python", "numpy"}


def wait_for_epochs(client, experiment: str, epochs: int, process: subprocess.Popen, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id]) if found else []
        if runs and len(client.get_metric_history(runs[0].info.run_id, "train_loss")) >= epochs:
            return runs[0].info.run_id
        time.sleep(0.3)
    raise AssertionError("training did not reach the wanted epoch in time")


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_ends_the_run_killed_with_a_checkpoint(tracking_uri, experiment, mlflow_client, tmp_path, signum, code):
    process = subprocess.Popen(
        [sys.executable, "-m", "optiflow", "train", "--epochs", "1000", "--model", "mlp:hidden=[16]", "-q",
         "--tracking-uri", tracking_uri, "--experiment", experiment],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ,
    )
    try:
        run_id = wait_for_epochs(mlflow_client, experiment, 2, process)
        process.send_signal(signum)
        sent = time.monotonic()
        _, stderr = process.communicate(timeout=60)
        assert time.monotonic() - sent < 30, "the process exits promptly"
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == code
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Error: interrupted by {signal.Signals(signum).name}"), stderr
    assert f"optiflow train --resume {run_id}" in lines[0]
    run = mlflow_client.get_run(run_id)
    assert run.info.status == "KILLED"
    logged = len(mlflow_client.get_metric_history(run_id, "train_loss"))
    state = torch.load(mlflow_client.download_artifacts(run_id, "checkpoint/last.pt", str(tmp_path)), weights_only=True)
    assert state["epoch"] == logged >= 2, "the checkpoint is the last epoch whose metrics were logged"


SLOW_TRAIN = "\n".join([
    "import sys, time",
    "from optiflow import hookimpl",
    "from optiflow.cli import main",
    "from optiflow.plugins import registered_plugin",
    "class OneSecondEpochs:",
    "    @hookimpl",
    "    def optiflow_epoch_end(self, run, epoch, metrics):",
    "        time.sleep(1.0)",
    "sys.argv = ['optiflow', *sys.argv[1:]]",
    "with registered_plugin(OneSecondEpochs(), name='one-second-epochs'):",
    "    main()",
])  # optiflow train with epochs a second long, so the checks below happen while the run still trains


@pytest.mark.slow
def test_a_sigkilled_run_is_stale_and_resumes_to_the_end(tracking_uri, experiment, mlflow_client, tmp_path, invoke):
    """SIGKILL leaves the run RUNNING; its per-epoch checkpoint and heartbeat let --resume finish the same run."""
    env = {**os.environ, "OPTIFLOW_CHECKPOINT_SECONDS": "0"}
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_TRAIN, "train", "--epochs", "12", "--model", "mlp:hidden=[16]", "--batch-size", "16",
         "-q", "--tracking-uri", tracking_uri, "--experiment", experiment],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        run_id = wait_for_epochs(mlflow_client, experiment, 3, process)
        alive = invoke("train", "--resume", run_id, "--tracking-uri", tracking_uri, "-q", store=False)
        assert alive.exit_code == 2 and "is RUNNING and its process may still be training it" in alive.stderr
        assert run_id not in invoke("runs", "--stale", "--tracking-uri", tracking_uri, store=False).output
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert mlflow_client.get_run(run_id).info.status == "RUNNING"
    listed = invoke("runs", "--stale", "--tracking-uri", tracking_uri, store=False)
    assert listed.exit_code == 0 and f"{run_id}" in listed.output and "is gone" in listed.output
    result = invoke("train", "--resume", run_id, "--tracking-uri", tracking_uri, "-q", store=False)
    assert result.exit_code == 0, result.output
    run = mlflow_client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["optiflow.resumed_from_epoch"]) >= 2
    assert {step for step, _ in metric_history(mlflow_client, run_id, "train_loss")} == set(range(1, 13))
    assert run_id not in invoke("runs", "--stale", "--tracking-uri", tracking_uri, store=False).output


def test_runs_stale_close_ends_a_run_whose_process_is_gone_killed(tracking_uri, experiment, mlflow_client, invoke):
    from optiflow import heartbeat

    run_id = mlflow_client.create_run(mlflow_client.create_experiment(experiment)).info.run_id
    mlflow_client.set_tag(run_id, heartbeat.TAG, "elsewhere 123 1000")  # another host, long ago
    result = invoke("runs", "--stale", "--close", "--tracking-uri", tracking_uri, store=False)
    assert result.exit_code == 0 and run_id in result.output and "heartbeat from elsewhere" in result.output
    run = mlflow_client.get_run(run_id)
    assert run.info.status == "KILLED" and "closed by optiflow runs" in run.data.tags["failure"]


def test_a_parent_is_stale_only_when_no_descendant_lives_and_closes_with_its_children(tracking_uri, experiment,
                                                                                      mlflow_client, invoke):
    """A search's parent whose own process is gone lives on while another worker trains one of its trials; once
    none does, ``runs --stale --close`` ends it and its children, those without a heartbeat of their own too."""
    from optiflow import heartbeat

    experiment_id = mlflow_client.create_experiment(experiment)
    dead, alive = "elsewhere 123 1000", heartbeat.stamp()  # another host long ago; this very process now

    def run(beat, parent=None):
        tags = {**({heartbeat.TAG: beat} if beat else {}), **({"mlflow.parentRunId": parent} if parent else {})}
        return mlflow_client.create_run(experiment_id, tags=tags).info.run_id

    parent = run(dead)
    trial = run(dead, parent)
    cv_trial = run(dead, parent)
    fold = run(alive, cv_trial)
    unbeaten = run(None, parent)
    listed = invoke("runs", "--stale", "--tracking-uri", tracking_uri, store=False).output
    assert trial in listed and parent not in listed and cv_trial not in listed and fold not in listed
    mlflow_client.set_tag(fold, heartbeat.TAG, dead)
    result = invoke("runs", "--stale", "--close", "--tracking-uri", tracking_uri, store=False)
    assert result.exit_code == 0
    for run_id in (parent, trial, cv_trial, fold, unbeaten):
        closed = mlflow_client.get_run(run_id)
        assert closed.info.status == "KILLED" and "closed by optiflow runs" in closed.data.tags["failure"], run_id
    assert "its parent run's process is gone" in mlflow_client.get_run(unbeaten).data.tags["failure"]
    order = result.output.index
    assert order(parent) < order(trial) and order(cv_trial) < order(fold)


#: runs ``optiflow ARGS`` (or, with OLD_STORE, MLflow's own creation of a store, as optiflow 0.1 did) and sends
#: itself a signal right after the first SQL statement holding ``STATEMENT`` (HALT_AT=STATEMENT|SIGNAL), while
#: MLflow creates and migrates a new store's tables: the moment is exact, no sleeps decide it
CREATING = "\n".join([
    "import os, signal, sys",
    "signal.signal(signal.SIGINT, signal.default_int_handler)",  # as from a terminal, though pytest may run
    "from sqlalchemy import event",                              # as a background job (SIGINT ignored)
    "from sqlalchemy.engine import Engine",
    "statement, _, name = os.environ['HALT_AT'].partition('|')",
    "def halt(connection, cursor, sql, *rest):",
    "    if statement.lower() in sql.lower():",
    "        os.kill(os.getpid(), getattr(signal, name))",
    "event.listen(Engine, 'after_cursor_execute', halt)",
    "if os.environ.get('OLD_STORE'):",
    "    from mlflow import MlflowClient",
    "    MlflowClient(os.environ['OLD_STORE']).search_experiments()",
    "from optiflow.cli import main",
    "sys.argv = ['optiflow', *sys.argv[1:]]",
    "main()",
])
# the two failures an interrupted creation left: a batch migration's copy table, a column added but not recorded
HALTS = [("CREATE TABLE _alembic_tmp_experiment_tags", "SIGINT"), ("ADD COLUMN outputs", "SIGKILL")]


def halted(at: tuple[str, str], args: list[str], cwd, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CREATING, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HALT_AT": "|".join(at), **env})


@pytest.mark.slow
@pytest.mark.parametrize("at", HALTS, ids=["copy-table-SIGINT", "added-column-SIGKILL"])
def test_a_signal_while_a_new_store_is_created_leaves_no_half_made_store(tmp_path, at):
    path = tmp_path / "mlflow.db"
    uri = f"sqlite:///{path}"
    train = ["train", "--data", "iris", "--model", "mlp:hidden=[16]", "--epochs", "1", "-q", "--tracking-uri", uri]
    done = halted(at, train, tmp_path)
    if at[1] == "SIGINT":
        assert done.returncode == 130 and done.stderr.strip() == "Error: interrupted", done.stderr
    else:
        assert done.returncode == -signal.SIGKILL, done.stderr
    assert not path.exists(), "no half-made store in place"
    again = subprocess.run([sys.executable, "-m", "optiflow", *train], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if ".creating" in p.name) == [], "the partial file is removed"
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(uri).search_runs([e.experiment_id for e in MlflowClient(uri).search_experiments()])
    assert [run.info.status for run in runs] == ["FINISHED"]


@pytest.mark.slow
@pytest.mark.parametrize("at", HALTS, ids=["copy-table", "added-column"])
def test_a_store_left_half_made_by_an_older_version_is_one_line(tmp_path, invoke, at):
    path = tmp_path / "old.db"
    done = halted((at[0], "SIGKILL"), [], tmp_path, OLD_STORE=f"sqlite:///{path}")
    assert done.returncode == -signal.SIGKILL and path.exists(), done.stderr
    result = invoke("runs", "--tracking-uri", f"sqlite:///{path}", store=False)
    assert result.exit_code == 2
    assert result.output.strip() == (f"Error: the tracking store {path} was left half-created by an interrupted "
                                     "command and holds no runs; delete it (and old.db-wal, old.db-shm beside it) "
                                     "and run again"), result.output


@pytest.mark.slow
def test_ctrl_c_during_a_search_with_workers_is_one_line_and_its_runs_killed(tmp_path):
    """Ctrl-C reaches the whole foreground process group: the search and its spawned worker process."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    process = subprocess.Popen(
        [sys.executable, "-m", "optiflow", "search", "--data", "iris", "--model", "mlp:hidden=[16]", "--epochs",
         "100000", "--n-trials", "4", "--n-jobs", "2", "--space", "lr=loguniform:0.01:0.1", "--no-refit", "-q",
         "--tracking-uri", uri, "--experiment", "ctrl-c"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        client, deadline = MlflowClient(uri), time.monotonic() + 240
        while time.monotonic() < deadline:  # both processes train a trial
            assert process.poll() is None, process.communicate()
            found = client.get_experiment_by_name("ctrl-c") if (tmp_path / "mlflow.db").exists() else None
            runs = client.search_runs([found.experiment_id]) if found else []
            trials = [r for r in runs if "optuna.trial_number" in r.data.params]
            if len(trials) == 2 and all(client.get_metric_history(r.info.run_id, "train_loss") for r in trials):
                break
            time.sleep(0.3)
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: interrupted"), stderr
    runs = client.search_runs([client.get_experiment_by_name("ctrl-c").experiment_id])
    trials = [r for r in runs if "optuna.trial_number" in r.data.params]
    assert len(trials) == 2 and {r.info.status for r in runs} == {"KILLED"}, [(r.info.run_name, r.info.status)
                                                                             for r in runs]
