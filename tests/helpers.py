"""Helpers shared by the test modules (fixtures stay in conftest.py); import them as ``from helpers import ...``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: int = 300):
    """Run the real ``optiflow`` executable in a subprocess (exit codes, stderr, signals)."""
    return subprocess.run(
        [sys.executable, "-m", "optiflow", *args],
        cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )


def trained_run(folder: Path, experiment: str, *args: str) -> tuple[str, Any]:
    """``optiflow train -q ARGS`` into a new SQLite store in ``folder`` (experiment ``experiment``), as a
    subprocess: (its tracking URI, its one run)."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{folder / 'mlflow.db'}"
    result = run_cli("train", *args, "-q", "--tracking-uri", store, "--experiment", experiment, cwd=folder)
    assert result.returncode == 0, result.stderr
    [run] = runs_of(MlflowClient(store), experiment)
    return store, run


def runs_of(client, experiment: str):
    """The runs of ``experiment``, oldest first; the experiment must exist."""
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} was not created"
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def assert_no_run(client, experiment: str) -> None:
    """Nothing was logged: ``experiment`` does not exist, or holds no run."""
    found = client.get_experiment_by_name(experiment)
    assert found is None or not client.search_runs([found.experiment_id]), f"{experiment} holds a run"


def metric_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every logged value of metric ``key``, by step."""
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def tracked_status(result: Any) -> str:
    """The status of a training's MLflow run as the tracking store holds it."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(result.tracking_uri).get_run(result.run_id).info.status


def free_port() -> int:
    """A local TCP port nothing listens on (just released by the OS)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sklearn_digits_test_split(run: Any) -> Any:
    """The test split of ``run`` (an MLflow run of the digits dataset) as scikit-learn gives it:
    ``load_digits(as_frame=True).frame``'s rows (64 ``pixel_*`` columns of 0..16 and ``target``),
    picked by the run's logged split settings."""
    import torch
    from sklearn.datasets import load_digits

    from optiflow.data import DataSource, split

    frame = load_digits(as_frame=True).frame
    row = torch.arange(len(frame), dtype=torch.float32)[:, None]  # the split depends on the labels and seed only
    source = DataSource(row, torch.tensor(frame["target"].to_numpy()), "classification", num_classes=10)
    params = run.data.params
    picked = split(source, float(params["val_split"]), float(params["test_split"]), int(params["seed"])).x_test
    return frame.iloc[picked[:, 0].long().numpy()]
