"""examples/plugin-example installs like any third-party plugin, is found by its entry point, and trains."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_cli, runs_of

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugin-example"


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory) -> Path:
    """A plain (non-editable) pip install of a copy of the example (no build files in the tree) into a folder."""
    source = tmp_path_factory.mktemp("example-source") / "plugin-example"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("example-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(source)],
        check=True, capture_output=True, text=True, cwd=target,
    )
    return target


def env_of(target: Path, **extra: str) -> dict[str, str]:
    """This environment with ``target`` on the import path and no plugin switches set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTIFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH")) if p)
    return {**env, **extra}


@pytest.mark.slow
def test_example_plugin_is_found_by_its_entry_point(installed_example, tmp_path):
    shown = run_cli("plugins", "--json", cwd=tmp_path, env=env_of(installed_example))
    assert shown.returncode == 0, shown.stderr
    rows = {row["name"]: row for row in json.loads(shown.stdout)}
    example = rows["example"]
    assert (example["distribution"], example["version"], example["status"]) == ("optiflow-example", "0.1.0", "loaded")
    assert example["components"] == {"dataset": ["noisy-labels", "spirals", "two-moons"],
                                     "optimizer": ["example/adam", "lion"], "regularizer": ["confusion-matrix", "ema"]}
    assert (example["namespaced_only"], example["clashes"]) == ({"optimizer": ["example/adam"]}, [])
    assert "Warning" not in shown.stderr
    assert example["hooks"] == ["optiflow_register_data", "optiflow_register_optimizers",
                                "optiflow_register_regularizers"]
    located = subprocess.run([sys.executable, "-c", "import optiflow_example; print(optiflow_example.__file__)"],
                             env=env_of(installed_example), capture_output=True, text=True, cwd=tmp_path, check=True)
    assert located.stdout.startswith(str(installed_example)), "the installed copy, not the source tree"

    blocked = run_cli("list", "optimizer", cwd=tmp_path,
                      env=env_of(installed_example, OPTIFLOW_DISABLE_PLUGINS="optiflow-example"))
    assert blocked.returncode == 0 and "lion" not in blocked.stdout and "adam" in blocked.stdout


@pytest.mark.slow
def test_example_plugin_trains_from_the_cli(installed_example, tmp_path, tracking_uri, experiment, mlflow_client):
    trained = run_cli(
        "train", "--data", "spirals:n=300", "--model", "mlp:hidden=[32,32]", "--opt", "lion:lr=0.003",
        "--reg", "ema:decay=0.9", "--epochs", "3", "-q", "--tracking-uri", tracking_uri, "--experiment", experiment,
        cwd=tmp_path, env=env_of(installed_example),
    )
    assert trained.returncode == 0, trained.stderr
    [run] = runs_of(mlflow_client, experiment)
    assert run.info.status == "FINISHED"
    assert run.data.params["opt"] == "lion" and run.data.params["data"] == "spirals"
    assert run.data.params["reg.ema.decay"] == "0.9"
    history = mlflow_client.get_metric_history(run.info.run_id, "ema_val_accuracy")
    assert [m.step for m in history] == [1, 2, 3]


@pytest.mark.slow
def test_example_plugin_passes_its_own_tests_installed(installed_example, tmp_path, tracking_uri):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        env=env_of(installed_example, MLFLOW_TRACKING_URI=tracking_uri), cwd=tmp_path,
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
