"""Shared fixtures: a throw-away MLflow store per test session and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.setdefault("MLFLOW_VALIDATE_SERVING_INPUT", "false")


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the whole session (creating its tables takes seconds)."""
    path = tmp_path_factory.mktemp("mlruns") / "mlflow.db"
    return f"sqlite:///{path}"


@pytest.fixture
def experiment() -> str:
    """A fresh experiment name, so each test sees only its own runs."""
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def mlflow_client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


@pytest.fixture
def invoke(tracking_uri: str, experiment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run ``optiflow ARGS`` in-process against the session store; returns click's Result."""
    from optiflow.cli import cli

    monkeypatch.chdir(tmp_path)

    def run(*args: str, store: bool = True):
        argv = list(args)
        if store and argv and argv[0] in {"train", "compare", "search", "reproduce"}:
            argv += ["--tracking-uri", tracking_uri, "--experiment", experiment]
        return CliRunner().invoke(cli, argv, prog_name="optiflow", catch_exceptions=False)

    return run


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: int = 300):
    """Run the real ``optiflow`` executable in a subprocess (exit codes, stderr, signals)."""
    return subprocess.run(
        [sys.executable, "-m", "optiflow", *args],
        cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )


def runs_of(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} was not created"
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
