"""Faults around a run: a full disk, a truncated store, a checkpoint that does not match the run, temp files.

Each ends in one line on stderr and a non-zero exit, never a traceback, never a run left RUNNING where
the store can be written, never a half-written store or checkpoint. (SIGKILL-then-resume lives in
test_failures.py.)
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from optiflow import hookimpl

from helpers import run_cli, runs_of

SMALL = ("--data", "iris", "--model", "mlp:hidden=[256]", "--batch-size", "16", "-q")


def one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs, unmounted afterwards; skipped where mounting is not allowed (not root, a container)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this machine")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'not permitted'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` until only about ``leave`` bytes are free."""
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave))


def integrity(db: Path) -> str:
    with sqlite3.connect(db) as connection:
        return connection.execute("PRAGMA integrity_check").fetchone()[0]


@pytest.mark.slow
def test_full_artifact_disk_fails_the_run_in_one_line_naming_the_path(small_disk, tmp_path):
    """The store's database elsewhere, the artifacts on a full tmpfs: FAILED, no partial file, a whole store."""
    from mlflow.tracking import MlflowClient

    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    MlflowClient(uri).create_experiment("full", artifact_location=(small_disk / "artifacts").as_uri())
    fill(small_disk, leave=150_000)
    result = run_cli("train", "--epochs", "2", *SMALL, "--tracking-uri", uri, "--experiment", "full", cwd=tmp_path,
                     timeout=300)
    line = one_line(result)
    assert result.returncode == 1
    assert f"no space left on the device holding {small_disk}" in line and "free some space" in line, line
    assert "kB free" in line and "needed" in line
    [run] = runs_of(MlflowClient(uri), "full")
    assert run.info.status == "FAILED"
    assert run.data.tags["failure"].startswith("no space left on the device holding")
    assert not list(small_disk.rglob("*.partial")), "a half-written checkpoint was left"
    assert integrity(db) == "ok"


@pytest.mark.slow
def test_full_disk_under_the_store_is_one_line_without_sqlalchemy_tracebacks(small_disk, tmp_path):
    """The SQLite store itself on a full tmpfs (MLflow logged 40+ lines of SQLAlchemy traceback)."""
    from mlflow.tracking import MlflowClient

    db = small_disk / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").create_experiment("full")
    fill(small_disk, leave=16_000)
    result = run_cli("train", "--epochs", "1", *SMALL, "--tracking-uri", f"sqlite:///{db}", "--experiment", "full",
                     cwd=tmp_path, timeout=300)
    line = one_line(result)
    assert result.returncode == 1
    assert f"no space left on the device holding {db}" in line, line
    (small_disk / "filler").unlink()
    assert integrity(db) == "ok"


def test_full_checkpoint_folder_keeps_the_last_checkpoint_whole(small_disk, monkeypatch):
    """A periodic checkpoint that finds no room: DiskFull naming the folder, the previous last.pt untouched."""
    import torch

    from optiflow import checkpoints
    from optiflow.errors import DiskFull

    folder = small_disk / "checkpoint"
    monkeypatch.setattr(checkpoints, "_local_checkpoint_folder", lambda tracker: folder)
    tracker = type("Tracker", (), {})()
    checkpoints.save(tracker, {"format": 1, "weights": torch.zeros(1000)})
    before = (folder / checkpoints.CHECKPOINT_FILE).read_bytes()
    fill(small_disk, leave=50_000)
    with pytest.raises(DiskFull, match=f"no space left on the device holding {folder} .*kB needed"):
        checkpoints.save(tracker, {"format": 1, "weights": torch.zeros(200_000)})
    assert (folder / checkpoints.CHECKPOINT_FILE).read_bytes() == before
    assert torch.load(folder / checkpoints.CHECKPOINT_FILE, weights_only=True)["weights"].shape == (1000,)
    assert sorted(p.name for p in folder.iterdir()) == [checkpoints.CHECKPOINT_FILE]


@pytest.mark.slow
def test_truncated_store_is_one_line_and_exit_2(tmp_path):
    from mlflow.tracking import MlflowClient

    cut = tmp_path / "cut.db"
    client = MlflowClient(f"sqlite:///{cut}")
    client.create_run(client.create_experiment("cut"))
    os.truncate(cut, cut.stat().st_size // 2)
    size = cut.stat().st_size
    for args in (["train", "--epochs", "1", *SMALL], ["runs", "--stale"], ["reproduce", "0123456789abcdef"]):
        # 60 s: MLflow retries a failing connect for ~100 s; the damage must be said by the first query instead
        result = run_cli(*args, "--tracking-uri", f"sqlite:///{cut}", cwd=tmp_path, timeout=60)
        line = one_line(result)
        assert result.returncode == 2, result.stderr
        assert f"cannot reach the tracking store sqlite:///{cut}: database disk image is malformed" in line, line
    assert cut.stat().st_size == size


class FailAt:
    """Fails the run at the end of epoch ``epoch`` (FAILED, with a checkpoint to resume from)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    @hookimpl
    def optiflow_epoch_end(self, run, epoch, metrics):
        if epoch == self.epoch:
            raise ValueError("stop here")


def _failed_run(config) -> None:
    from optiflow.commands.train import train
    from optiflow.plugins import get_plugin_manager

    pm = get_plugin_manager()
    pm.register(FailAt(2), name="fail-at-2")
    try:
        with pytest.raises(Exception, match="stop here"):
            train(config)
    finally:
        pm.unregister(name="fail-at-2")


def _checkpoint_file(client, run_id: str) -> Path:
    from urllib.parse import urlparse

    from optiflow.checkpoints import CHECKPOINT_DIR, CHECKPOINT_FILE

    return Path(urlparse(client.get_run(run_id).info.artifact_uri).path) / CHECKPOINT_DIR / CHECKPOINT_FILE


class Planted:
    """An object only an unsafe (pickle) load would build."""


def _edit(path: Path, change) -> None:
    import torch

    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


CHECKPOINT_EDITS = {
    "rng-3-bytes": (lambda s: s["rng"].__setitem__("torch", s["rng"]["torch"][:3]),
                    "the checkpoint does not fit this run: its random generator states cannot be restored"),
    "batch-rng-not-bytes": (lambda s: s["rng"].__setitem__("batches", s["rng"]["batches"].float()),
                            "its random generator states cannot be restored (the batches state is not a byte tensor)"),
    "numpy-rng-key-not-a-tensor": (lambda s: s["rng"].__setitem__("numpy", ("MT19937", [1, 2], 0, 0, 0.0)),
                                   "its random generator states cannot be restored ("),
    "epoch-not-an-integer": (lambda s: s.__setitem__("epoch", "abc"),
                             "the checkpoint does not fit this run: its epoch must be an integer in [0, 4], got 'abc'"),
    "epoch-beyond-the-run": (lambda s: s.__setitem__("epoch", 99), "its epoch must be an integer in [0, 4], got '99'"),
    "weights-of-another-dtype": (lambda s: s["model"].__setitem__(next(iter(s["model"])),
                                                                  next(iter(s["model"].values())).double()),
                                 "the model's is (16, 4) torch.float32"),
    "adam-moment-of-another-shape": (lambda s: s["optimizer"]["state"][0].__setitem__("exp_avg", s["optimizer"]["state"][0]["exp_avg"][:1]),
                                     "its optimizer's exp_avg of parameter 0 is (1, 4), the parameter is (16, 4)"),
    "queued-metrics-not-tuples": (lambda s: s.__setitem__("metrics", ["x"]),
                                  "its queued metrics are not (key, value, timestamp, step)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["other-model", "truncated", "not-a-checkpoint", "pickled-object",
                                    *CHECKPOINT_EDITS])
def test_resume_refuses_a_checkpoint_that_does_not_match_the_run(tracking_uri, experiment, mlflow_client, invoke,
                                                                 damage):
    """Everything is checked before the run reopens: the run keeps its status and failure tag, the checkpoint
    stays, and the refusal never passes on torch's advice to load the file unsafely."""
    import torch

    from optiflow.config import RunConfig

    def config(hidden: str):
        return RunConfig.from_dict({"data": "iris", "model": f"mlp:hidden=[{hidden}]", "epochs": 4, "batch_size": 32,
                                    "tracking_uri": tracking_uri, "experiment": experiment})

    _failed_run(config("16"))
    _failed_run(config("8,8"))
    first, second = runs_of(mlflow_client, experiment)
    target = _checkpoint_file(mlflow_client, first.info.run_id)
    if damage == "other-model":
        shutil.copy(_checkpoint_file(mlflow_client, second.info.run_id), target)
        expect = "the checkpoint does not fit this run: its model has other layers (only in the checkpoint: "
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        expect = f"the checkpoint of run {first.info.run_id} cannot be read"
    elif damage == "pickled-object":
        torch.save({"format": 1, "planted": Planted()}, target)
        expect = (f"the checkpoint of run {first.info.run_id} cannot be read: it holds Python objects "
                  f"({Planted.__module__}.Planted) that only an unsafe load would build")
    elif damage in CHECKPOINT_EDITS:
        change, expect = CHECKPOINT_EDITS[damage]
        _edit(target, change)
    else:
        target.write_bytes(b"not a checkpoint")
        expect = f"the checkpoint of run {first.info.run_id} cannot be read"
    before = target.read_bytes()
    result = invoke("train", "--resume", first.info.run_id, "--tracking-uri", tracking_uri, store=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expect in lines[0], result.stderr
    assert "weights_only" not in result.stderr
    assert target.read_bytes() == before, "the checkpoint was overwritten"
    run = mlflow_client.get_run(first.info.run_id)
    assert run.info.status == "FAILED" and run.data.tags["failure"] == first.data.tags["failure"]
    assert len(runs_of(mlflow_client, experiment)) == 2


@pytest.mark.slow
def test_train_runs_leave_no_file_in_tmpdir(tmp_path, tracking_uri, experiment):
    """Temp files optiflow creates (checkpoint downloads, logged figures, model export) are removed, after a
    finished run, a failing one and a refused one alike."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {"TMPDIR": str(tmpdir), "MPLCONFIGDIR": str(tmp_path / "mpl")}
    store = ["--tracking-uri", tracking_uri, "--experiment", experiment]
    finished = run_cli("train", "--epochs", "2", *SMALL, *store, cwd=tmp_path, env=env, timeout=300)
    assert finished.returncode == 0, finished.stderr
    failing = run_cli("train", "--epochs", "2", "--data", "iris", "--lr", "1e6", "--opt", "sgd", "-q", *store,
                      cwd=tmp_path, env=env, timeout=300)
    assert failing.returncode != 0 and "Traceback" not in failing.stderr
    refused = run_cli("train", "--opt", "adamm", *store, cwd=tmp_path, env=env, timeout=120)
    assert refused.returncode == 2
    # torch's inductor keeps its cache in TMPDIR/torchinductor_<user> by default; everything else must be gone
    left = [p for p in tmpdir.rglob("*") if not p.relative_to(tmpdir).parts[0].startswith("torchinductor_")]
    assert left == []


class LoseStore:
    """Deletes the SQLite store (or puts another database in its place) at the end of epoch 3."""

    def __init__(self, db: Path, how: str) -> None:
        self.db, self.how = db, how

    @hookimpl
    def optiflow_epoch_end(self, run, epoch, metrics):
        if epoch != 3:
            return
        if self.how == "deleted":
            for path in self.db.parent.glob(self.db.name + "*"):
                path.unlink()
        else:
            other = self.db.with_name("other.db")
            with sqlite3.connect(other) as connection:
                connection.execute("create table notes (x)")
            os.replace(other, self.db)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_store_that_vanishes_during_training_stops_it_with_the_checkpoint_kept(tmp_path, invoke, plugin, how,
                                                                                  monkeypatch):
    """MLflow would go on writing into the unlinked file and report success: the next write notices instead, one
    line names the store, exit 1, and the checkpoint and configuration are kept in a local folder it prints."""
    import torch

    monkeypatch.setenv("OPTIFLOW_CHECKPOINT_SECONDS", "0")
    db = tmp_path / "store" / "mlflow.db"
    plugin(LoseStore(db, how), "lose-store")
    result = invoke("train", "--epochs", "8", *SMALL, "--tracking-uri", f"sqlite:///{db}", store=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and f"Error: the tracking store sqlite:///{db} was {how}" in lines[0], result.stderr
    folder = tmp_path / lines[0].rsplit(" kept in ", 1)[1]  # relative to the working folder
    state = torch.load(folder / "last.pt", weights_only=True)
    assert state["epoch"] >= 3 and "data: iris" in (folder / "config.yaml").read_text()
    assert folder.parent.name == "optiflow-rescued"
    if how == "deleted":
        assert not db.exists(), "nothing wrote a new store in its place"


@pytest.mark.slow
def test_a_store_on_a_read_only_file_system_is_one_line(small_disk, tmp_path):
    store = ["--tracking-uri", f"sqlite:///{small_disk}/mlflow.db"]
    made = run_cli("train", "--epochs", "1", *SMALL, *store, cwd=tmp_path, timeout=300)
    assert made.returncode == 0, made.stderr
    done = subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot remount read-only here ({done.stderr.strip()})")
    for args in (("train", "--epochs", "1", *SMALL, "--no-reuse"), ("runs", "--stale")):  # a reused run writes nothing
        result = run_cli(*args, *store, cwd=tmp_path, timeout=120)
        line = one_line(result)
        assert result.returncode == 2, result.stderr
        assert f"cannot write to the tracking store {small_disk}/mlflow.db: Read-only file system" in line


def test_full_disk_under_predict_output_exits_1_and_leaves_no_file(small_disk):
    """``predict --output`` on a full device: DiskFull (exit code 1, as every full disk) naming the file, and
    neither an empty file nor a partial one left (pandas wrote into the open target and left 0 bytes)."""
    import pandas as pd

    from optiflow.commands.predict import Predictions, write_predictions
    from optiflow.errors import DiskFull

    table = pd.DataFrame({"id": range(50_000), "prediction": ["setosa"] * 50_000, "prob_setosa": 0.5})
    predictions = Predictions("runs:/x/model", None, table, None, None)
    fill(small_disk, leave=20_000)
    target = small_disk / "predictions.csv"
    with pytest.raises(DiskFull, match=f"no space left on the device holding {target} .*kB needed") as raised:
        write_predictions(predictions, str(target))
    assert raised.value.exit_code == 1
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]
    (small_disk / "filler").unlink()
    write_predictions(predictions, str(target))
    assert len(pd.read_csv(target)) == 50_000
