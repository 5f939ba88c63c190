"""SIGKILL at chosen moments of a training, a search and a comparison: afterwards ``optiflow runs --stale
--close`` leaves no run RUNNING, and a killed training resumes to the metrics of an uninterrupted one, every
metric's steps logged once.

The process kills itself at a moment named ``EVENT:N`` (``KILL_AT``): right after the N-th ``create_run``,
at the N-th epoch's end (before its metrics are recorded), or right after the N-th checkpoint is saved and
before the metrics it covers are written. No polling and no sleeps decide the moment, so each case is exact.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import metric_history

pytestmark = pytest.mark.slow

DRIVER = "\n".join([
    "import os, signal, sys, time",
    "from optiflow import checkpoints, hookimpl",
    "from optiflow.cli import main",
    "from optiflow.plugins import registered_plugin",
    "from optiflow.tracking import Tracker",
    "event, _, at = os.environ['KILL_AT'].partition(':')",
    "seen = {'create': 0, 'epoch': 0, 'save': 0}",
    "def tick(name):",
    "    seen[name] += 1",
    "    if name == event and seen[name] == int(at):",
    "        os.kill(os.getpid(), signal.SIGKILL)",
    "create_run = Tracker._create",  # where a tracker creates its run (one transaction on a SQL store)
    "def create(self, *args, **kwargs):",
    "    run_id = create_run(self, *args, **kwargs)",
    "    tick('create')",
    "    return run_id",
    "Tracker._create = create",
    "save = checkpoints.save",
    "def saved(*args, **kwargs):",
    "    save(*args, **kwargs)",
    "    tick('save')",
    "checkpoints.save = saved",
    "class Moments:",
    "    @hookimpl",
    "    def optiflow_epoch_end(self, run, epoch, metrics):",
    "        time.sleep(float(os.environ.get('EPOCH_SECONDS', '0')))",
    "        tick('epoch')",
    "sys.argv = ['optiflow', *sys.argv[1:]]",
    "with registered_plugin(Moments(), name='moments'):",
    "    main()",
])

EPOCHS = 10
TRAIN = ("train", "--data", "iris", "--model", "mlp:hidden=[16]", "--batch-size", "16", "--epochs", str(EPOCHS))
SEARCH = ("search", "--data", "iris", "--model", "mlp:hidden=[16]", "--epochs", "2", "--n-trials", "2",
          "--space", "lr=loguniform:1e-3:1e-1", "--sampler", "random", "--cv", "2", "--no-reuse")
# --no-reuse: each moment is run again into one store, and its first child must train again, not be reused
COMPARE = ("compare", "--data", "iris", "--model", "mlp:hidden=[16]", "--epochs", "2", "--vary", "lr=0.01,0.1",
           "--no-reuse")
# the search: parent (create 1), per trial a cross-validated run (2, 3; its two stacked folds are written in one
# transaction, not through create_run), the refit (4, its first checkpoint is save 1); the comparison: parent (create 1), a child per variant (2, 3; epochs 1-2, 3-4)
MOMENTS = {
    "train": ["create:1", "epoch:2", "save:2", "epoch:7", "epoch:10"],
    "search": ["create:1", "create:2", "create:3", "create:4", "save:1"],
    "compare": ["create:1", "create:2", "save:1", "epoch:3", "epoch:4"],
}
EXACT = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy", "lr")


def killed(command: tuple[str, ...], moment: str, store: str, cwd: Path) -> None:
    """Run ``command`` until it SIGKILLs itself at ``moment``."""
    env = {**os.environ, "KILL_AT": moment, "EPOCH_SECONDS": "0.3" if command[0] == "train" else "0"}
    env.pop("OPTIFLOW_CHECKPOINT_SECONDS", None)  # the default cadence: metrics written after checkpoints only
    args = [*command, "-q", "--tracking-uri", store, "--experiment", "killed"]
    if command[0] == "compare":
        args += ["--out", str(cwd / "compare")]
    process = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=cwd, env=env, capture_output=True,
                             text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, f"not killed at {moment}: {process.stderr[-2000:]}"


def running(client) -> list[str]:
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return [r.info.run_id for r in client.search_runs(experiments, "attributes.status = 'RUNNING'")]


def close_stale(invoke, store: str, client) -> list[str]:
    """``optiflow runs --stale --close``; returns the runs it closed, after checking none stays RUNNING."""
    left = running(client)
    result = invoke("runs", "--stale", "--close", "--tracking-uri", store, store=False)
    assert result.exit_code == 0, result.output
    assert running(client) == [], f"still RUNNING after runs --stale --close: {result.output}"
    for run_id in left:
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and "closed by optiflow runs" in run.data.tags["failure"]
    return left


@pytest.fixture
def store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, MlflowClient(uri)


@pytest.mark.parametrize("command", [SEARCH, COMPARE], ids=["search", "compare"])
def test_a_killed_search_or_comparison_leaves_no_run_running_after_close(store, tmp_path, invoke, command):
    uri, client = store
    for moment in MOMENTS[command[0]]:
        killed(command, moment, uri, tmp_path)
        left = close_stale(invoke, uri, client)
        assert left, f"the kill at {moment} left no RUNNING run to find"
        parents = [r for r in left if "mlflow.parentRunId" not in client.get_run(r).data.tags]
        assert len(parents) == 1, f"at {moment}: the parent run was not closed with its children"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The final metrics of the training run through without a kill."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("uninterrupted")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    done = subprocess.run([sys.executable, "-m", "optiflow", *TRAIN, "-q", "--tracking-uri", uri], cwd=folder,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [run] = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("optiflow").experiment_id])
    return run.data.metrics


@pytest.mark.parametrize("moment", MOMENTS["train"])
def test_a_killed_training_is_found_and_resumes_counting_every_epoch_once(store, tmp_path, invoke, uninterrupted,
                                                                          moment):
    import math

    uri, client = store
    killed(TRAIN, moment, uri, tmp_path)
    [run_id] = running(client)
    listed = invoke("runs", "--stale", "--tracking-uri", uri, store=False)
    assert run_id in listed.output and "is gone" in listed.output
    result = invoke("train", "--resume", run_id, "--tracking-uri", uri, "-q", store=False)
    if moment == "create:1":  # killed before its first epoch: nothing to resume from, said in one line
        assert result.exit_code == 2 and f"run '{run_id}' has no config.yaml artifact" in result.stderr
        close_stale(invoke, uri, client)
        return
    assert result.exit_code == 0, result.output
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "val_loss", "lr", "epoch_time"):
        steps = [step for step, _ in metric_history(client, run_id, key)]
        assert steps == list(range(1, EPOCHS + 1)), f"{key} after the kill at {moment}: steps {steps}"
    for key in EXACT:
        assert math.isclose(run.data.metrics[key], uninterrupted[key], rel_tol=1e-6, abs_tol=1e-9), key
