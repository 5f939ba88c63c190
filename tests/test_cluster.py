"""Beyond one machine, against real servers: search workers sharing a PostgreSQL study and an MLflow tracking
server with basic auth, one of them SIGKILLed; a worker losing its database or its tracking server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from services import (
    SECRETS,
    start_mlflow_server,
    start_postgres,
    status_without_credentials,
)

pytestmark = pytest.mark.slow

SEARCH = ["search", "--space", "lr=loguniform:1e-3:1e-1", "--space", "hidden=int:16:64", "--sampler", "random",
          "--data", "digits", "--model", "mlp", "--heartbeat", "2", "-q"]


@pytest.fixture(scope="module")
def services():
    """PostgreSQL (two databases: Optuna's and MLflow's, which both keep an ``alembic_version`` table) and
    ``mlflow server --app-name basic-auth`` on it, both on loopback; torn down after the module."""
    roots = [Path(tempfile.mkdtemp(prefix=f"optiflow-{name}-")) for name in ("pg", "mlflow")]
    server = None
    try:
        postgres = start_postgres(roots[0])
        server = start_mlflow_server(roots[1], postgres.url("mlflow"))
        yield postgres, server
    finally:
        if server is not None:
            server.stop()
        if "postgres" in locals():
            postgres.stop()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


def optiflow(*args: str, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "optiflow", *args], cwd=cwd, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_running_trial(store: MlflowClient, experiment: str, pid: int, timeout: float = 240) -> str:
    """The id of a RUNNING trial run trained by process ``pid`` (its heartbeat tag names the pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = store.get_experiment_by_name(experiment)
        if found is not None:
            for run in store.search_runs([found.experiment_id], "attributes.status = 'RUNNING'"):
                beat = run.data.tags.get("optiflow.heartbeat", "")
                if "optuna.trial_number" in run.data.tags and beat.split(" ")[1:2] == [str(pid)]:
                    return run.info.run_id
        time.sleep(0.3)
    raise AssertionError(f"process {pid} never held a running trial")


def test_two_workers_share_a_postgres_study_and_survive_a_sigkill(services, tmp_path, monkeypatch):
    postgres, server = services
    storage = postgres.url("optuna")
    env = {**server.client_env(), "MLFLOW_TRACKING_URI": server.url}
    for name, value in server.client_env().items():
        monkeypatch.setenv(name, value)
    store = MlflowClient(server.url)
    command = [*SEARCH, "--storage", storage, "--study-name", "shared", "--n-trials", "8", "--epochs", "3",
               "--experiment", "cluster"]
    first = optiflow(*command, env=env, cwd=tmp_path)
    time.sleep(3)  # the first creates the study and the parent run; the second joins them
    second = optiflow(*command, env=env, cwd=tmp_path)
    while True:  # stopped first: a trial that ends between the look and the kill is not the one killed
        killed_run = wait_for_running_trial(store, "cluster", second.pid)
        second.send_signal(signal.SIGSTOP)
        if store.get_run(killed_run).info.status == "RUNNING":
            break
        second.send_signal(signal.SIGCONT)
    second.send_signal(signal.SIGKILL)
    second.communicate(timeout=60)
    out, err = first.communicate(timeout=480)
    assert first.returncode == 0, err

    study = optuna.load_study(study_name="shared", storage=storage)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") in (8, 9), states  # the total across workers, overshoot <= workers - 1
    [dead] = [t for t in study.trials if t.state.name == "FAIL"]
    # the run of the killed trial: recorded on it, unless the kill came between opening the run and recording it
    assert dead.user_attrs.get("mlflow_run_id", killed_run) == killed_run
    assert store.get_run(killed_run).data.tags["optuna.trial_number"] == str(dead.number)
    [retry] = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
    assert retry.state.name == "COMPLETE" and retry.params == dead.params

    experiment = store.get_experiment_by_name("cluster").experiment_id
    runs = store.search_runs([experiment], max_results=1000)
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    [parent] = [r for r in runs if r.data.tags.get("optiflow.kind") == "search"]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r is not parent]
    assert {r.data.tags.get("mlflow.parentRunId") for r in children} == {parent.info.run_id}
    killed = store.get_run(killed_run)
    assert killed.info.status == "KILLED" and "no heartbeat" in killed.data.tags["failure"]
    [refit] = [r for r in children if r.data.tags.get("optiflow.role") == "refit"]
    assert refit.info.status == "FINISHED" and parent.data.tags["refit_run_id"] == refit.info.run_id
    assert refit.data.tags["optiflow.refit_of_trial"] == str(study.best_trial.number)
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials if t.state.name == "COMPLETE"} <= \
        {r.info.run_id for r in children}
    assert store.search_runs(["0"]) == []  # nothing in the Default experiment

    # no secret in what was logged or printed
    logged = [err, out]
    for run in runs:
        logged += [*run.data.params.values(), *run.data.tags.values()]
    for artifact in ("config.yaml", "space.yaml"):
        logged.append(Path(store.download_artifacts(parent.info.run_id, artifact, str(tmp_path))).read_text())
    assert parent.data.params["storage"] == storage.replace(":pg-secret-4711@", ":***@")
    assert not [text for text in logged for secret in SECRETS if secret in text]

    assert status_without_credentials(server.url) == 401


def test_two_workers_on_postgres_stop_at_the_target_within_the_budget(services, tmp_path, monkeypatch):
    """--target and --budget read from the shared PostgreSQL study: each worker stops after its trial in flight
    once any trial reached the target; both print plain progress lines, the parent says why the study stopped;
    a --dry-run on the same storage touches nothing."""
    postgres, server = services
    env = {**server.client_env(), "MLFLOW_TRACKING_URI": server.url}
    command = ["search", "--space", "lr=loguniform:0.02:0.1", "--sampler", "random", "--model", "mlp:hidden=[16]",
               "--storage", postgres.url("optuna"), "--study-name", "target", "--n-trials", "20", "--epochs", "2",
               "--target", "val_accuracy=0.3", "--budget", "5m", "--no-refit", "--experiment", "target", "-q"]
    dry = optiflow(*command, "--dry-run", env=env, cwd=tmp_path)
    out, err = dry.communicate(timeout=300)
    assert dry.returncode == 0 and "estimated total" in out, err
    assert "target" not in optuna.get_all_study_names(postgres.url("optuna"))
    workers = [optiflow(*command, env=env, cwd=tmp_path) for _ in range(2)]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], [err for _, err in outputs]
    study = optuna.load_study(study_name="target", storage=postgres.url("optuna"))
    assert 1 <= len(study.trials) <= 2 and {t.state.name for t in study.trials} == {"COMPLETE"}
    lines = [line for out, _ in outputs for line in out.splitlines() if line.startswith("[")]
    assert len(lines) == len(study.trials) and all("ETA" in line for line in lines)
    for name, value in server.client_env().items():
        monkeypatch.setenv(name, value)
    store = MlflowClient(server.url)
    [parent] = [r for r in store.search_runs([store.get_experiment_by_name("target").experiment_id])
                if r.data.tags.get("optiflow.kind") == "search"]
    assert parent.info.status == "FINISHED" and parent.data.tags["stop_reason"] == "target"


def test_rerunning_the_command_continues_toward_the_total(services, tmp_path, monkeypatch):
    postgres, server = services
    env = {**server.client_env(), "MLFLOW_TRACKING_URI": server.url}
    command = [*SEARCH, "--storage", postgres.url("optuna"), "--study-name", "resumed", "--epochs", "1",
               "--experiment", "resumed"]
    for n_trials in ("2", "3"):
        process = optiflow(*command, "--n-trials", n_trials, env=env, cwd=tmp_path)
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    study = optuna.load_study(study_name="resumed", storage=postgres.url("optuna"))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    for name, value in server.client_env().items():
        monkeypatch.setenv(name, value)
    store = MlflowClient(server.url)
    runs = store.search_runs([store.get_experiment_by_name("resumed").experiment_id])
    assert len([r for r in runs if r.data.tags.get("optiflow.kind") == "search"]) == 1


def test_a_training_logs_everything_to_the_tracking_server(services, tmp_path, monkeypatch):
    """Params, metrics, figures, files, the model and the checkpoint, over http with basic auth."""
    _, server = services
    process = optiflow("train", "--epochs", "2", "--experiment", "over-http",
                       env={**server.client_env(), "MLFLOW_TRACKING_URI": server.url}, cwd=tmp_path)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert server.url in out  # the summary's "open the UI" is the server's own URL
    for name, value in server.client_env().items():
        monkeypatch.setenv(name, value)
    store = MlflowClient(server.url)
    [run] = store.search_runs([store.get_experiment_by_name("over-http").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["opt"] and "test_accuracy" in run.data.metrics
    assert [m.step for m in store.get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    logged = {a.path for a in store.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "normalization.json", "learning_curves.png"} <= logged
    assert {a.path for a in store.list_artifacts(run.info.run_id, "checkpoint")} == {"checkpoint/last.pt"}
    import mlflow.pyfunc

    previous = mlflow.get_tracking_uri()  # an earlier test in this process may have set the global one
    mlflow.set_tracking_uri(server.url)
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    finally:
        mlflow.set_tracking_uri(previous)
    from sklearn.datasets import load_digits

    assert model.predict(load_digits().data[:4].reshape(-1, 1, 8, 8).astype("float32")).shape[0] == 4


def test_a_worker_that_loses_its_database_says_so_in_one_line(tmp_path):
    root = Path(tempfile.mkdtemp(prefix="optiflow-lost-db-"))
    postgres = start_postgres(root, databases=("optuna",))
    try:
        storage = postgres.url("optuna")
        process = optiflow(*SEARCH, "--storage", storage, "--n-trials", "50", "--epochs", "50",
                           "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", env={}, cwd=tmp_path)
        err = stop_midway(process, lambda: _has_running_trial(storage), postgres.stop, bound=90)
    finally:
        postgres.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert process.returncode == 1
    line = assert_one_line(err)
    assert line.startswith(f"Error: lost the study storage postgresql+psycopg://optiflow:***@127.0.0.1:{postgres.port}"), line
    assert "pg-secret" not in err


def test_a_worker_that_loses_its_tracking_server_says_so_in_one_line(tmp_path):
    server = start_mlflow_server(tmp_path / "server", f"sqlite:///{tmp_path / 'server' / 'm.db'}", auth=False)
    try:
        process = optiflow("train", "--epochs", "500", "--tracking-uri", server.url, "-q", env={}, cwd=tmp_path)
        store = MlflowClient(server.url)
        err = stop_midway(process, lambda: bool(store.search_runs(["0", *_experiments(store)])), server.stop,
                          bound=120)
    finally:
        server.stop()
    assert process.returncode == 1
    line = assert_one_line(err)
    assert line.startswith(f"Error: lost the tracking server {server.url}"), line


def stop_midway(process: subprocess.Popen, ready, stop, bound: float) -> str:
    """Once ``ready()`` (the process is mid-work), ``stop()`` the service it uses; the process must end within
    ``bound`` seconds. Returns its stderr."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not ready():
        time.sleep(0.3)
    stop()
    stopped = time.monotonic()
    _, err = process.communicate(timeout=bound + 60)
    assert time.monotonic() - stopped < bound, err
    return err


def assert_one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


def _experiments(store: MlflowClient) -> list[str]:
    return [e.experiment_id for e in store.search_experiments()]


def _has_running_trial(storage: str) -> bool:
    try:
        study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    except Exception:  # no study yet, or the database not ready
        return False
    return any(t.state.name == "RUNNING" for t in study.get_trials(deepcopy=False))
