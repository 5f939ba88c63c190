"""Shared fixtures: a throw-away MLflow store per test session, a CLI runner, plugins registered for one test.

Plain helper functions live in helpers.py.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.setdefault("MLFLOW_VALIDATE_SERVING_INPUT", "false")

# test_search.py (edited elsewhere) still imports runs_of from here; new code imports it from helpers.
from helpers import runs_of  # noqa: E402,F401


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


@pytest.fixture
def plugin():
    """``plugin(obj, name)`` registers ``obj``'s hook implementations until the test ends."""
    from optiflow.plugins import get_plugin_manager

    pm = get_plugin_manager()
    names = []

    def register(obj, name):
        pm.register(obj, name=name)
        names.append(name)

    yield register
    for name in names:
        pm.unregister(name=name)
