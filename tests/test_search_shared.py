"""A study shared by workers, some of them killed (SIGKILL, OOM): claims taken over, --n-trials never exceeded."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import optuna
import pytest

from conftest import runs_of

TINY = ("--model", "mlp:hidden=[16]", "--batch-size", "64", "--sampler", "random", "--epochs", "1")


def dead_pid() -> int:
    """The pid of a process of this host that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def plant(storage: str, name: str, claim: str, holder: str) -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True)
    study._storage.set_study_system_attr(study._study_id, f"optiflow.claim.{claim}", holder)
    return study


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_claim_whose_holder_is_gone_is_taken_over_and_a_live_or_done_one_is_not(kind, tmp_path, monkeypatch):
    from optiflow.search.claims import claim, holder, settle

    storage = f"sqlite:///{tmp_path / 'study.db'}" if kind == "sqlite" else optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.log")))
    host, now = socket.gethostname(), time.time()
    study = plant(storage, "s", "a", f"{host} {dead_pid()} {now:.0f}")
    assert claim(study, "a") and not claim(study, "a")  # taken over, then held by this live process
    plant(storage, "s", "b", f"elsewhere 1 {now - 7200:.0f}")  # another host, silent for two hours
    assert claim(study, "b")
    plant(storage, "s", "c", f"elsewhere 1 {now - 60:.0f}")  # another host, a minute ago: may still live
    assert not claim(study, "c")
    assert holder(study, "c").startswith("elsewhere pid 1 at ")
    settle(study, "a", "refit run 123")
    assert not claim(study, "a") and holder(study, "a") == "done: refit run 123"


def test_a_search_proceeds_past_a_parent_claim_held_by_a_killed_worker(invoke, tmp_path, mlflow_client, experiment):
    """A worker SIGKILLed while setting up the study leaves the claim; the next one must not wait and fail."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    plant(storage, "killed", "parent-run", f"{socket.gethostname()} {dead_pid()} {time.time():.0f}")
    started = time.monotonic()
    result = invoke("search", "--space", "lr=loguniform:1e-3:1e-1", "--n-trials", "1", "--storage", storage,
                    "--study-name", "killed", "--no-refit", "-q", *TINY)
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started < 60
    [parent] = [r for r in runs_of(mlflow_client, experiment) if "mlflow.parentRunId" not in r.data.tags]
    assert optuna.load_study(study_name="killed", storage=storage).user_attrs[
        "optiflow.mlflow_parent_run_id"] == parent.info.run_id


def test_a_rerun_refits_when_the_refitting_worker_was_killed(invoke, tmp_path, mlflow_client, experiment,
                                                             tracking_uri):
    """The refit's worker SIGKILLed: its claim held by a dead pid, its run RUNNING. A rerun ends that run KILLED,
    refits, and marks the claim done so that a third run refits nothing."""
    from optiflow.tracking import Tracker

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = ("search", "--space", "lr=loguniform:1e-3:1e-1", "--n-trials", "1", "--storage", storage,
            "--study-name", "refit", "-q", *TINY)
    assert invoke(*args, "--no-refit").exit_code == 0
    study = optuna.load_study(study_name="refit", storage=storage)
    parent_id = study.user_attrs["optiflow.mlflow_parent_run_id"]
    dead = Tracker(tracking_uri, experiment)
    dead_id = dead.start(run_name="refit trial 0", parent_run_id=parent_id,
                         tags={"optiflow.role": "refit", "optiflow.refit_of_trial": "0"})
    plant(storage, "refit", "refit-of-trial-0", f"{socket.gethostname()} {dead_pid()} {time.time():.0f}")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert mlflow_client.get_run(dead_id).info.status == "KILLED"
    refits = [r for r in runs_of(mlflow_client, experiment) if r.data.tags.get("optiflow.role") == "refit"]
    [done] = [r for r in refits if r.info.run_id != dead_id]
    assert done.info.status == "FINISHED"
    assert mlflow_client.get_run(parent_id).data.tags["refit_run_id"] == done.info.run_id
    assert invoke(*args).exit_code == 0
    assert len([r for r in runs_of(mlflow_client, experiment) if r.data.tags.get("optiflow.role") == "refit"]) == 2


def test_a_worker_racing_another_runs_no_trial_over_n_trials(tmp_path, tracking_uri, experiment):
    """Five trials finished and one running in another worker: with --n-trials 6 this worker trains nothing
    (the trial it asked for is failed unrun and left out of the summary)."""
    from optiflow.config import RunConfig
    from optiflow.search.objective import run_trials
    from optiflow.search.space import parse_space
    from optiflow.search.study import SearchSettings
    from optiflow.search.workers import OVER_ATTR

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="race")
    for _ in range(5):
        study.tell(study.ask(), 0.5)
    study.ask()  # another worker's trial, running
    base = RunConfig(epochs=1, tracking_uri=tracking_uri, experiment=experiment)
    settings = SearchSettings(space=parse_space(["lr=loguniform:1e-3:1e-1"], base), sampler="random", n_trials=6)
    run_trials(base, settings, study, "no-parent", 3, total=6)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE"] * 5 + ["RUNNING", "FAIL"]
    assert study.trials[-1].user_attrs[OVER_ATTR] and not study.trials[-1].params


def test_a_rerun_after_a_mid_trial_kill_ends_with_exactly_n_trials(invoke, tmp_path):
    """Trial 2's worker killed (RUNNING, heartbeat stopped): a rerun at once retries it instead of adding a
    trial, so --n-trials 3 ends with 3 complete trials, not 4."""
    from optiflow.search.study import open_storage

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = ("search", "--space", "lr=loguniform:1e-3:1e-1", "--storage", storage, "--study-name", "rerun",
            "--heartbeat", "1", "--no-refit", "-q", *TINY)
    assert invoke(*args, "--n-trials", "2").exit_code == 0
    study = optuna.load_study(study_name="rerun", storage=open_storage(storage, heartbeat=1))
    killed = study.ask()
    study._storage.record_heartbeat(killed._trial_id)
    result = invoke(*args, "--n-trials", "3")
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="rerun", storage=storage)
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 3
