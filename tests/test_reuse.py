"""A finished run is never trained twice: the content key changes with everything that changes a run's result and
with nothing else, and train, compare and search reuse a FINISHED run of the same key (a rerun of an interrupted
compare or search trains only what did not finish)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataset_files import write_csv
from helpers import runs_of

TINY = ("--data", "digits", "--model", "mlp:hidden=[8]", "--epochs", "1")


def key_of(**changes: object) -> str:
    from optiflow.config import RunConfig
    from optiflow.plugins import get_registry
    from optiflow.reuse import planned_key

    return planned_key(RunConfig.from_dict({"data": "digits", "device": "cpu", **changes}), get_registry())


#: a value other than the default for every setting the key holds (a new RunConfig field fails the test below
#: until it is listed here or in NOT_IN_KEY)
CHANGED = {"epochs": 3, "batch_size": 16, "seed": 1, "val_split": 0.2, "test_split": 0.3, "cv_folds": 3,
           "cv_fold": 1, "shuffle": False, "drop_last": True, "workers": 1, "compile": True, "channels_last": True,
           "amp": "bf16", "deterministic": True}


def test_every_setting_is_in_the_key_or_said_not_to_be():
    from optiflow.config import RunConfig
    from optiflow.runkey import NOT_IN_KEY
    from optiflow.slots import SLOT_BY_KEY

    settings = {f.name for f in dataclasses.fields(RunConfig)} - set(SLOT_BY_KEY) - NOT_IN_KEY
    assert settings == set(CHANGED)
    for name, value in CHANGED.items():
        unchanged = {"cv_folds": 3} if name == "cv_fold" else {}  # a fold exists only with folds
        assert key_of(**{**unchanged, name: value}) != key_of(**unchanged), name


@pytest.mark.parametrize("change", [{"opt": "sgd"}, {"opt": "adam:amsgrad=true"}, {"lr": 0.5}, {"model": "mlp:hidden=[9]"},
                                    {"norm": "minmax"}, {"reg": ["dropout:p=0.2"]}, {"sched": "cosine"},
                                    {"data": "digits:image=false"}, {"data": "iris"}])
def test_what_changes_the_result_changes_the_key(change):
    assert key_of(**change) != key_of()


@pytest.mark.parametrize("same", [{"run_name": "another"}, {"experiment": "elsewhere"}, {"tracking_uri": "sqlite:///x.db"},
                                  {"data_dir": "/somewhere/else"}, {"pin_memory": True}, {"log_step_loss": True},
                                  {"opt": "adam:lr=0.001"}, {"lr": 0.001}, {"opt": "adam:betas=[0.9,0.999]"},
                                  {"device": "auto"}])
def test_what_does_not_change_the_result_keeps_the_key(same):
    """Names, places and speed-ups keep the key, and so does an option written out at its default value (the default
    optimizer adam's lr is 0.001) or given by --lr; ``auto`` is the CPU here: the key holds the kind of device."""
    import torch

    if same.get("device") == "auto" and torch.cuda.is_available():
        pytest.skip("auto is CUDA here")
    assert key_of(**same) == key_of()


def test_the_data_is_keyed_by_its_bytes_not_its_path(tmp_path: Path):
    first, moved = tmp_path / "a.csv", tmp_path / "elsewhere" / "b.csv"
    moved.parent.mkdir()
    write_csv(first)
    moved.write_bytes(first.read_bytes())
    key = key_of(data=f"csv:path={first},target=label")
    assert key_of(data=f"csv:path={moved},target=label") == key
    text = first.read_text().splitlines()
    text[5] = text[5].replace(text[5].split(",")[0], "9.8765", 1)
    first.write_text("\n".join(text) + "\n")
    assert key_of(data=f"csv:path={first},target=label") != key


def test_a_plugin_or_optiflow_version_changes_the_key(monkeypatch: pytest.MonkeyPatch):
    import optiflow
    from optiflow.plugins import get_plugin_manager

    key = key_of()
    pm = get_plugin_manager()
    monkeypatch.setitem(pm.distributions, "optimizers", ("optiflow-optimizers", "9.9"))
    assert key_of() != key
    monkeypatch.delitem(pm.distributions, "optimizers")
    assert key_of() == key
    monkeypatch.setattr(optiflow, "__version__", "99.0")
    assert key_of() != key


def test_a_plugin_hooked_into_every_run_changes_the_key(plugin):
    """A plugin implementing a per-run hook may change what a run computes: its presence (and version) is keyed;
    one adding only a command is not."""
    from optiflow import hookimpl

    class Watcher:
        @hookimpl
        def optiflow_epoch_end(self, run, epoch, metrics):
            pass

    class Commands:
        @hookimpl
        def optiflow_register_commands(self, cli):
            pass

    key = key_of()
    plugin(Commands(), "commands-only")
    assert key_of() == key
    plugin(Watcher(), "watcher")
    assert key_of() != key


def test_train_reuses_a_finished_run(invoke, mlflow_client, experiment):
    first = invoke("train", *TINY)
    assert first.exit_code == 0, first.output
    (run,) = runs_of(mlflow_client, experiment)
    again = invoke("train", *TINY, "--run-name", "a new name")
    assert again.exit_code == 0, again.output
    assert "reused" in again.output and run.info.run_id in again.output
    assert len(runs_of(mlflow_client, experiment)) == 1
    quiet = invoke("train", *TINY, "-q")  # the reused run is the result: named even under -q, in one line
    assert quiet.exit_code == 0 and quiet.output.strip().splitlines() == [
        f"reused run {run.info.run_id}: a finished run with the same content key (--no-reuse trains anew)"]
    assert invoke("train", *TINY, "--no-reuse").exit_code == 0
    runs = runs_of(mlflow_client, experiment)
    assert len(runs) == 2 and runs[0].data.tags["optiflow.key"] == runs[1].data.tags["optiflow.key"]
    assert invoke("train", *TINY, "--epochs", "2").exit_code == 0
    assert len(runs_of(mlflow_client, experiment)) == 3


def test_a_run_holding_less_than_asked_is_not_reused(tracking_uri, experiment, mlflow_client, invoke):
    """A run logged without its model (a search trial's kind) is not what `optiflow train` returns: it trains."""
    from optiflow.config import RunConfig
    from optiflow.training import train

    config = RunConfig.from_dict({"data": "digits", "epochs": 1, "model": "mlp:hidden=[8]",
                                  "tracking_uri": tracking_uri, "experiment": experiment})
    bare = train(config, log_model=False, artifacts=False)
    assert train(config, log_model=False, artifacts=False, reuse=True).run_id == bare.run_id
    result = invoke("train", *TINY)
    assert result.exit_code == 0 and "reused" not in result.output
    assert len(runs_of(mlflow_client, experiment)) == 2


def test_compare_reuses_finished_variants_and_names_them_on_its_parent(invoke, mlflow_client, experiment, tmp_path):
    assert invoke("compare", *TINY, "--vary", "opt=sgd,adam", "--out", str(tmp_path / "a")).exit_code == 0
    sgd = next(r for r in runs_of(mlflow_client, experiment) if r.data.tags.get("optiflow.variant") == "opt=sgd")
    result = invoke("compare", *TINY, "--vary", "opt=sgd,rmsprop", "--out", str(tmp_path / "b"))
    assert result.exit_code == 0, result.output
    assert "reused 1 of 2 runs" in result.output
    runs = runs_of(mlflow_client, experiment)
    parent = next(r for r in reversed(runs) if r.data.tags.get("optiflow.kind") == "compare")
    assert parent.data.tags["optiflow.reused"] == "1 of 2 runs"
    assert parent.data.tags["optiflow.reused_runs"] == f"opt=sgd: {sgd.info.run_id}"
    rows = (tmp_path / "b" / "runs.csv").read_text().splitlines()
    assert rows[1].startswith("opt=sgd,0,FINISHED," + sgd.info.run_id) and rows[1].endswith(",yes")
    assert not rows[2].endswith(",yes")
    trained = len(runs)
    result = invoke("compare", *TINY, "--vary", "opt=sgd,rmsprop", "--no-reuse", "--out", str(tmp_path / "c"))
    assert result.exit_code == 0 and "reused" not in result.output
    assert len(runs_of(mlflow_client, experiment)) == trained + 3


def test_search_trials_repeating_parameters_reuse_their_score(invoke, mlflow_client, experiment):
    result = invoke("search", *TINY, "--space", "opt=choice:sgd,adam", "--sampler", "random", "--sampler-seed", "0",
                    "--n-trials", "5", "--no-refit")
    assert result.exit_code == 0, result.output
    runs = runs_of(mlflow_client, experiment)
    parent = next(r for r in runs if r.data.tags.get("optiflow.kind") == "search")
    trained = [r for r in runs if "optiflow.key" in r.data.tags]
    assert len({r.data.params["opt"] for r in trained}) == len(trained) <= 2
    reused = 5 - len(trained)
    assert f"reused {reused} of 5 trials" in result.output
    assert parent.data.tags["optiflow.reused"] == f"{reused} of 5 trials"
    ids = {r.info.run_id for r in trained}
    pairs = [pair.rpartition(": ") for pair in parent.data.tags["optiflow.reused_runs"].split("; ")]
    assert len(pairs) == reused and all(label.startswith("trial ") and run_id in ids for label, _, run_id in pairs)


def test_search_with_cv_reuses_every_fold(invoke, mlflow_client, experiment):
    result = invoke("search", *TINY, "--space", "opt=choice:sgd,adam", "--sampler", "random", "--sampler-seed", "0",
                    "--n-trials", "4", "--cv", "2", "--no-refit")
    assert result.exit_code == 0, result.output
    runs = runs_of(mlflow_client, experiment)
    folds = [r for r in runs if "optiflow.key" in r.data.tags]
    trials = [r for r in runs if r.data.tags.get("optiflow.kind") == "cross-validation"]
    assert len(folds) == 2 * len(trials) and len({r.data.tags["optiflow.key"] for r in folds}) == len(folds)
    assert f"reused {4 - len(trials)} of 4 trials" in result.output


def test_a_trial_trains_only_the_folds_no_finished_run_holds(invoke, mlflow_client, experiment, tracking_uri):
    """Fold 0 of the trial already finished (trained alone, as an interrupted trial leaves it): the trial reuses it,
    trains fold 1 under its own cross-validation run, and scores the mean of both."""
    from optiflow.config import RunConfig
    from optiflow.training import train

    fold0 = train(RunConfig.from_dict({"data": "digits", "model": "mlp:hidden=[8]", "epochs": 1, "cv_folds": 2,
                                       "cv_fold": 0, "tracking_uri": tracking_uri, "experiment": experiment}),
                  log_model=False, artifacts=False)
    result = invoke("search", *TINY, "--space", "opt=choice:adam", "--n-trials", "1", "--cv", "2", "--no-refit",
                    "--metric", "val_accuracy")
    assert result.exit_code == 0, result.output
    runs = runs_of(mlflow_client, experiment)
    (trial,) = [r for r in runs if r.data.tags.get("optiflow.kind") == "cross-validation"]
    assert trial.data.tags["optiflow.reused"] == "1 of 2 folds"
    assert trial.data.tags["optiflow.reused_runs"] == f"fold 0: {fold0.run_id}"
    (fold1,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == trial.info.run_id]
    assert fold1.data.tags["optiflow.cv_fold"] == "1"
    scores = [fold0.history["val_accuracy"][-1], fold1.data.metrics["val_accuracy"]]
    assert trial.data.metrics["cv_val_accuracy_mean"] == pytest.approx(sum(scores) / 2)


#: runs the command given, then interrupts itself (SIGNAL) as soon as the N-th run ends FINISHED (FINISHED_RUNS)
DRIVER = "\n".join([
    "import os, signal, sys",
    "from optiflow.cli import main",
    "from optiflow.tracking import Tracker",
    "ended = Tracker.end",  # where every run a tracker opened ends (folds written finished at once aside)
    "finished = [0]",
    "def end(self, status='FINISHED', *args, **kwargs):",
    "    ended(self, status, *args, **kwargs)",
    "    finished[0] += status == 'FINISHED'",
    "    if finished[0] == int(os.environ['FINISHED_RUNS']):",
    "        os.kill(os.getpid(), getattr(signal, os.environ['SIGNAL']))",
    "Tracker.end = end",
    "sys.argv = ['optiflow', *sys.argv[1:]]",
    "main()",
])


def interrupted_then_rerun(command: list[str], finished: int, signal_name: str, tmp_path: Path):
    """Run ``command`` until it interrupts itself after ``finished`` runs ended FINISHED, then run it again;
    returns the keyed runs FINISHED before the rerun, those after it, and the rerun's output."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*command, "--tracking-uri", store, "--experiment", "rerun"]
    env = {**os.environ, "FINISHED_RUNS": str(finished), "SIGNAL": signal_name}
    first = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode != 0, first.stdout + first.stderr

    def keyed() -> list[str]:
        return [r.info.run_id for r in runs_of(MlflowClient(store), "rerun")
                if "optiflow.key" in r.data.tags and r.info.status == "FINISHED"]

    before = keyed()
    rerun = subprocess.run([sys.executable, "-m", "optiflow", *args], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    return before, keyed(), rerun.stdout


@pytest.mark.slow
def test_an_interrupted_compare_rerun_trains_only_what_did_not_finish(tmp_path: Path):
    command = ["compare", *TINY, "--vary", "opt=sgd,adam", "--repeats", "3", "--out", str(tmp_path / "out")]
    before, after, output = interrupted_then_rerun(command, 4, "SIGINT", tmp_path)
    assert len(before) == 4
    assert len(after) == 6 and set(before) <= set(after)
    assert "reused 4 of 6 runs" in output
    rows = (tmp_path / "out" / "runs.csv").read_text().splitlines()[1:]
    assert sorted(row.split(",")[3] for row in rows if row.endswith(",yes")) == sorted(before)


@pytest.mark.slow
def test_a_killed_search_rerun_trains_only_the_trials_that_did_not_finish(tmp_path: Path):
    command = ["search", *TINY, "--space", "opt.lr=choice:0.01,0.02,0.03,0.04", "--sampler", "grid",
               "--sampler-seed", "0", "--no-refit"]
    before, after, output = interrupted_then_rerun(command, 2, "SIGKILL", tmp_path)
    assert len(before) == 2
    assert len(after) == 4 and set(before) <= set(after)
    assert "reused 2 of 4 trials" in output


def test_two_processes_give_the_same_run_the_same_key():
    """A fresh process computes the key a finished run was tagged with in another one: the default model's
    nested activation (an option whose value is a component) is keyed by its name and options, never by the
    address of its factory, so that `optiflow train` run twice reuses the first run."""
    script = ("from optiflow.config import RunConfig; from optiflow.plugins import get_registry; "
              "from optiflow.reuse import planned_key; "
              "print(*(planned_key(RunConfig.from_dict({'data': 'iris', 'device': 'cpu', 'model': model}), "
              "get_registry()) for model in ('mlp', 'mlp:activation=[leaky-relu:negative_slope=0.2]', "
              "'cnn:activation=tanh')))")
    keys = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
            for _ in range(2)]
    assert len(keys[0]) == 3 and len(set(keys[0])) == 3
    assert keys[0] == keys[1]
