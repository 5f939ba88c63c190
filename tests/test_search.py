"""`optiflow search` on Optuna: parent/child MLflow runs, samplers, pruning, CV, shared storages."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys

import optuna
import pytest
import torch
import yaml

from optiflow import hookimpl
from optiflow.search.study import SAMPLERS

from conftest import runs_of

TINY = ("--model", "mlp:hidden=[16]", "--batch-size", "64", "--no-refit", "-q")
REFIT = ("--model", "mlp:hidden=[16]", "--batch-size", "64")


def study_runs(client, experiment: str):
    """The parent runs and the trials' runs (not the refit, see refits())."""
    runs = runs_of(client, experiment)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.data.tags.get("optiflow.role") != "refit"]
    return parents, children


def refits(client, experiment: str):
    return [r for r in runs_of(client, experiment) if r.data.tags.get("optiflow.role") == "refit"]


def test_search_logs_a_parent_per_study_and_a_child_per_trial(invoke, mlflow_client, experiment):
    result = invoke("search", "--space", "lr=loguniform:1e-3:1e-1", "--space", "opt=choice:sgd,adam",
                    "--sampler", "random", "--sampler-seed", "3", "--n-trials", "3", "--epochs", "2", *TINY)
    assert result.exit_code == 0, result.stderr
    [parent], children = study_runs(mlflow_client, experiment)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sampler"] == "random" and parent.data.params["metric"] == "val_loss"
    assert parent.data.params["space.lr"] == "loguniform:0.001:0.1"
    assert len(children) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.params["optuna.trial_number"] for c in children) == ["0", "1", "2"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["optuna.sampler"] == "random" and child.data.params["optuna.pruner"] == "none"
        assert child.data.params["opt"] == child.data.params["trial.opt"]
        assert float(child.data.params["opt.lr"]) == pytest.approx(float(child.data.params["trial.lr"]))
        assert [m.step for m in mlflow_client.get_metric_history(child.info.run_id, "val_loss")] == [1, 2]
    best = min(children, key=lambda c: c.data.metrics["val_loss"])
    assert parent.data.metrics["best_value"] == pytest.approx(best.data.metrics["val_loss"])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.tags["best.opt"] == best.data.params["opt"]
    artifacts = {a.path for a in mlflow_client.list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "param_importances.png", "trials.csv", "best_params.yaml",
            "config.yaml", "space.yaml"} <= artifacts
    assert refits(mlflow_client, experiment) == [] and "refit_run_id" not in parent.data.tags  # --no-refit
    assert parent.data.params["refit"] == "False"


def test_pruned_trials_end_killed_and_failed_trials_failed(invoke, mlflow_client, experiment):
    """Grid order with seed 1 is lr=0.1, 1e30, 1e-6: a good run, a diverging one, then one that cannot
    learn in 3 epochs and that the median pruner stops after its first epoch."""
    result = invoke("search", "--opt", "sgd", "--space", "lr=choice:0.1,0.000001,1e30", "--sampler", "grid",
                    "--sampler-seed", "1", "--pruner", "median:n_startup_trials=1", "--epochs", "3", *TINY)
    assert result.exit_code == 0, result.stderr
    [parent], children = study_runs(mlflow_client, experiment)
    by_lr = {c.data.params["trial.lr"]: c for c in children}
    assert [by_lr[lr].data.params["optuna.trial_number"] for lr in ("0.1", "1e+30", "1e-06")] == ["0", "1", "2"]
    assert by_lr["0.1"].info.status == "FINISHED"
    assert by_lr["1e+30"].info.status == "FAILED" and "training loss became" in by_lr["1e+30"].data.tags["failure"]
    slow = by_lr["1e-06"]
    assert slow.info.status == "KILLED" and "pruned" in slow.data.tags["killed"]
    assert [m.step for m in mlflow_client.get_metric_history(slow.info.run_id, "val_loss")] == [1]
    assert parent.data.metrics["n_fail"] == 1 and parent.data.metrics["n_pruned"] == 1
    assert parent.info.status == "FINISHED"
    assert "intermediate_values.png" in {a.path for a in mlflow_client.list_artifacts(parent.info.run_id)}


def test_successive_halving_prunes_hopeless_trials(invoke, mlflow_client, experiment):
    """Trials that all learn next to nothing: successive halving keeps only the better half at each rung."""
    result = invoke("search", "--opt", "sgd", "--space", "lr=loguniform:1e-7:1e-6", "--sampler", "random",
                    "--sampler-seed", "0", "--pruner", "successive-halving:reduction_factor=2",
                    "--epochs", "3", "--n-trials", "4", *TINY)
    assert result.exit_code == 0, result.stderr
    [parent], children = study_runs(mlflow_client, experiment)
    killed = [c for c in children if c.info.status == "KILLED"]
    assert killed, [c.info.status for c in children]
    assert parent.data.metrics["n_pruned"] == len(killed)
    for child in killed:
        assert len(mlflow_client.get_metric_history(child.info.run_id, "val_loss")) < 3


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_a_tiny_study(invoke, mlflow_client, experiment, sampler):
    options = {"tpe": "tpe:n_startup_trials=2", "gp": "gp:n_startup_trials=2", "cmaes": "cmaes:n_startup_trials=2",
               "nsga2": "nsga2:population_size=2"}
    space = ["lr=choice:0.01,0.05"] if sampler == "grid" else ["lr=loguniform:1e-3:1e-1", "dropout=float:0:0.5"]
    args = [arg for item in space for arg in ("--space", item)]
    result = invoke("search", *args, "--sampler", options.get(sampler, sampler), "--sampler-seed", "1",
                    "--n-trials", "3", "--epochs", "1", *TINY)
    assert result.exit_code == 0, result.stderr
    [parent], children = study_runs(mlflow_client, experiment)
    expected = 2 if sampler == "grid" else 3
    assert len(children) == expected and all(c.info.status == "FINISHED" for c in children)
    assert parent.data.metrics["n_complete"] == expected
    assert {c.data.params["optuna.sampler"] for c in children} == {sampler}
    if sampler == "grid":
        assert sorted(c.data.params["trial.lr"] for c in children) == ["0.01", "0.05"]


def test_cross_validation_scores_each_trial_on_k_folds(invoke, mlflow_client, experiment):
    result = invoke("search", "--space", "lr=choice:0.01,0.001", "--sampler", "grid", "--cv", "3",
                    "--epochs", "1", *TINY)
    assert result.exit_code == 0, result.stderr
    runs = runs_of(mlflow_client, experiment)
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 2
    for trial in trials:
        folds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == trial.info.run_id]
        assert sorted(f.data.params["cv_fold"] for f in folds) == ["0", "1", "2"]
        assert all(f.data.params["cv_folds"] == "3" and f.info.status == "FINISHED" for f in folds)
        scores = [f.data.metrics["val_loss"] for f in folds]
        assert trial.data.metrics["cv_val_loss_mean"] == pytest.approx(sum(scores) / 3)
        assert trial.info.status == "FINISHED"
    assert parent.data.metrics["best_value"] == pytest.approx(min(t.data.metrics["cv_val_loss_mean"] for t in trials))


def test_cv_folds_partition_the_training_split():
    from optiflow.config import RunConfig
    from optiflow.data import split
    from optiflow.plugins import get_registry

    source = get_registry().get("dataset", "digits").build(*[type("C", (), {"seed": 0, "data_dir": "."})()])
    plain = split(source, 0.1, 0.2, seed=0)
    folds = [split(source, 0.1, 0.2, seed=0, cv_folds=4, cv_fold=k) for k in range(4)]
    rest = len(plain.x_train) + len(plain.x_val)
    assert sum(len(f.x_val) for f in folds) == rest
    assert all(len(f.x_train) + len(f.x_val) == rest for f in folds)
    assert all(torch.equal(f.x_test, plain.x_test) for f in folds)
    rows = torch.cat([f.x_val for f in folds])
    assert len(torch.unique(rows, dim=0)) == len(torch.unique(torch.cat([plain.x_train, plain.x_val]), dim=0))
    with pytest.raises(Exception, match="fold must be in"):
        RunConfig(cv_folds=3, cv_fold=3)


def test_two_processes_share_one_study_and_one_parent_run(tmp_path, tracking_uri, experiment, mlflow_client):
    """... and the study is refitted once, by the process that finishes it; --n-trials is the study's total."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    command = [sys.executable, "-m", "optiflow", "search", "--space", "lr=loguniform:1e-3:1e-1",
               "--sampler", "random", "--n-trials", "4", "--epochs", "1", "--storage", storage,
               "--study-name", "shared", "--tracking-uri", tracking_uri, "--experiment", experiment, *REFIT, "-q"]
    processes = [subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], errors
    [parent], children = study_runs(mlflow_client, experiment)
    assert parent.info.status == "FINISHED"
    numbers = sorted(int(c.data.params["optuna.trial_number"]) for c in children)
    assert numbers == list(range(len(numbers))) and len(numbers) == 4  # --n-trials exactly, however they race
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    study = optuna.load_study(study_name="shared", storage=storage)
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 4
    assert all(t.user_attrs.get("optiflow.over_n_trials") for t in study.trials if t.state.name != "COMPLETE")
    assert study.user_attrs["optiflow.mlflow_parent_run_id"] == parent.info.run_id
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials if t.state.name == "COMPLETE"} == {
        c.info.run_id for c in children}
    [refit] = refits(mlflow_client, experiment)
    assert refit.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.tags["refit_run_id"] == refit.info.run_id
    assert refit.data.tags["optiflow.refit_of_trial"] == str(study.best_trial.number)
    # what optuna-dashboard lists: the user's study alone, no lock studies beside it
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["shared"]


def test_n_jobs_runs_trials_in_worker_processes(invoke, mlflow_client, experiment, tmp_path):
    result = invoke("search", "--space", "lr=loguniform:1e-3:1e-1", "--sampler", "random", "--n-jobs", "2",
                    "--n-trials", "2", "--epochs", "1", "--storage", f"journal:{tmp_path / 'study.log'}", *TINY)
    assert result.exit_code == 0, result.stderr
    [parent], children = study_runs(mlflow_client, experiment)
    assert sorted(int(c.data.params["optuna.trial_number"]) for c in children) == [0, 1]
    assert all(c.info.status == "FINISHED" for c in children) and parent.info.status == "FINISHED"
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.log")))
    assert len(optuna.get_all_study_summaries(journal)) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("study.log")) == ["study.log"]  # no lock left


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_of_eight_racing_workers_exactly_one_takes_a_claim_and_a_released_one_is_taken_once_more(kind, tmp_path):
    """The claims that pick the one process creating the parent run and the one refitting, attacked: eight
    threads, each with its own connection to the storage, claim at the same moment."""
    import threading

    from optiflow.search.claims import claim, holder, release

    def open_study() -> optuna.Study:
        if kind == "sqlite":
            storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}",
                                                 engine_kwargs={"connect_args": {"timeout": 60}})
        else:
            storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.log")))
        return optuna.create_study(storage=storage, study_name="mine", load_if_exists=True)

    studies = [open_study() for _ in range(8)]

    def race() -> list[bool]:
        start, won = threading.Barrier(len(studies)), []

        def worker(study: optuna.Study) -> None:
            start.wait()
            won.append(claim(study, "parent-run"))

        threads = [threading.Thread(target=worker, args=(study,)) for study in studies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return won

    assert sorted(race()) == [False] * 7 + [True]
    assert "pid" in holder(studies[0], "parent-run")
    assert not claim(studies[3], "parent-run")
    release(studies[5], "parent-run")
    assert holder(studies[0], "parent-run") is None
    assert sorted(race()) == [False] * 7 + [True]
    assert claim(studies[2], "refit-of-trial-0")  # another name is another claim
    assert [s.study_name for s in optuna.get_all_study_summaries(studies[0]._storage)] == ["mine"]


def test_config_file_and_space_file(invoke, tmp_path):
    (tmp_path / "space.yaml").write_text("lr: loguniform:1e-4:1e-1\nopt: [sgd, adam]\n"
                                         "hidden: {type: int, low: 8, high: 64, step: 8}\n")
    (tmp_path / "search.yaml").write_text(f"epochs: 3\nsampler: tpe\nn_trials: 7\nspace: [{tmp_path / 'space.yaml'}]\n")
    result = invoke("search", "--config", str(tmp_path / "search.yaml"), "--space", "lr=float:0.01:0.1",
                    "--sampler", "random", "--print-config", store=False)
    assert result.exit_code == 0, result.stderr
    printed = yaml.safe_load(result.output)
    assert printed["epochs"] == 3 and printed["n_trials"] == 7 and printed["sampler"] == "random"
    assert printed["space"] == {"lr": "float:0.01:0.1", "opt": "choice:sgd|adam", "hidden": "int:8:64:8"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--space", "lr=loguniform:0:1"], "a log range needs LOW > 0"),
        (["--space", "lr=loguniform:1e-4:1e-1", "--heartbeat", "-1"], "--heartbeat must be >= 0 seconds"),
        (["--space", "lr=normal:0:1"], "unknown range 'normal'"),
        (["--space", "lr=float:0.1"], "write float:LOW:HIGH[:STEP]"),
        (["--space", "flux=int:1:3"], "not a setting or an option"),
        (["--space", "opt=choice:sgd,adamm"], "unknown optimizer 'adamm'"),
        (["--space", "lr=loguniform:1e-4:1e-1", "--sampler", "tpee"], "unknown sampler 'tpee' (did you mean 'tpe'?)"),
        (["--space", "lr=loguniform:1e-4:1e-1", "--sampler", "grid"], "the grid sampler needs finite values"),
        (["--space", "lr=loguniform:1e-4:1e-1", "--pruner", "median:patience=3"], "pruner 'median'"),
        (["--space", "lr=loguniform:1e-4:1e-1", "--storage", "study.db"], "is not a storage URL"),
        (["--space", "lr=loguniform:1e-4:1e-1", "--cv", "1"], "--cv needs at least 2 folds"),
        (["--space", "lr=loguniform:1e-4:1e-1", "--no-refit", "--register", "m"], "registers the refit model"),
        ([], "nothing to search"),
    ],
)
def test_bad_search_input_is_one_line_and_creates_no_run(invoke, mlflow_client, experiment, args, message):
    result = invoke("search", *args, "-q")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert mlflow_client.get_experiment_by_name(experiment) is None or not runs_of(mlflow_client, experiment)


@pytest.mark.slow
def test_search_refits_the_best_configuration_and_registers_it(invoke, mlflow_client, experiment, tracking_uri):
    """The best trial trained again on train + validation, scored on the same test split, model logged and
    registered; the summary names the refit run."""
    import mlflow
    import numpy as np

    result = invoke("search", "--space", "lr=choice:0.05,0.0001", "--sampler", "grid", "--opt", "sgd",
                    "--epochs", "2", "--register", experiment, *REFIT)
    assert result.exit_code == 0, result.stderr
    [parent], trials = study_runs(mlflow_client, experiment)
    [refit] = refits(mlflow_client, experiment)
    best = min(trials, key=lambda t: t.data.metrics["val_loss"])
    assert refit.data.tags["mlflow.parentRunId"] == parent.info.run_id and refit.info.status == "FINISHED"
    assert parent.data.tags["refit_run_id"] == refit.info.run_id
    assert refit.data.params["refit.trial_number"] == best.data.params["optuna.trial_number"]
    assert refit.data.params["opt.lr"] == best.data.params["opt.lr"] == "0.05"
    assert refit.data.params["val_split"] == "0.0" and "val_loss" not in refit.data.metrics
    n_train, n_val = (int(best.data.params[f"data.n_{k}"]) for k in ("train", "val"))
    assert int(refit.data.params["data.n_train"]) == n_train + n_val
    assert refit.data.params["data.n_test"] == best.data.params["data.n_test"]
    assert 0.5 < refit.data.metrics["test_accuracy"] <= 1.0
    assert refit.info.run_id in result.output and "refit of trial" in result.output
    assert f"test_accuracy={refit.data.metrics['test_accuracy']:.4f}" in result.output

    version = mlflow_client.get_model_version(experiment, "1")
    assert version.run_id == refit.info.run_id
    assert parent.data.tags["registered_model"] == f"models:/{experiment}/1"
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{experiment}/1")
    signature, card = model.metadata.signature, model.metadata.metadata["optiflow"]
    assert signature.inputs is None, "outputs only: optiflow_serving checks the inputs, naming what is wrong"
    assert signature.outputs.input_names() == card["classes"] == [str(c) for c in range(10)]
    assert card["input_shape"] == [1, 8, 8] and card["raw_input"] and card["image"]
    raw = np.random.default_rng(0).uniform(0, 16, (3, *card["input_shape"])).astype(np.float32)  # digits' 0..16
    predicted = model.predict(raw)
    assert predicted.shape == (3, 10) and list(predicted.columns) == card["classes"]


@pytest.mark.slow
def test_refit_keeps_a_validation_split_for_early_stopping_and_drops_the_folds(invoke, mlflow_client, experiment):
    result = invoke("search", "--space", "lr=choice:0.01", "--sampler", "grid", "--cv", "2", "--epochs", "2",
                    "--reg", "early-stopping:patience=1", *REFIT, "-q")
    assert result.exit_code == 0, result.stderr
    [refit] = refits(mlflow_client, experiment)
    assert refit.data.params["val_split"] == "0.1" and "cv_folds" not in refit.data.params
    assert "val_loss" in refit.data.metrics and "test_loss" in refit.data.metrics
    assert mlflow_client.search_logged_models([refit.info.experiment_id],
                                              f"source_run_id = '{refit.info.run_id}'")


def test_refit_config_has_no_fold_and_no_validation_unless_monitored():
    from optiflow.commands.search import settings_from
    from optiflow.config import RunConfig
    from optiflow.search.refit import refit_config

    def refit_of(**base_values):
        base = RunConfig.from_dict(base_values)
        settings = settings_from({"space": ["lr=loguniform:1e-4:1e-1", "momentum=uniform:0:0.9"], "cv": 3}, base)
        trial = optuna.trial.create_trial(params={"lr": 0.02, "momentum": 0.5}, value=0.1,
                                          distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1),
                                                         "momentum": optuna.distributions.FloatDistribution(0, 0.9)})
        return refit_config(base, settings, trial)

    plain = refit_of(opt="sgd", seed=4, test_split=0.3)
    assert (plain.val_split, plain.cv_folds, plain.seed, plain.test_split) == (0.0, 0, 4, 0.3)
    assert plain.lr == 0.02 and float(plain.opt.options["momentum"]) == 0.5
    assert refit_of(opt="sgd", reg=["early-stopping"], val_split=0.2).val_split == 0.2
    assert refit_of(opt="sgd", sched="plateau").val_split == 0.1
    assert refit_of(opt="sgd", sched="plateau:monitor=train_loss").val_split == 0.0


def test_a_failed_refit_keeps_the_study_summary(invoke, mlflow_client, experiment, plugin):
    class FailRefit:
        @hookimpl
        def optiflow_run_start(self, run):
            if (run.config.run_name or "").startswith("refit"):
                raise RuntimeError("no refit today")

    plugin(FailRefit(), "fail-refit")
    result = invoke("search", "--space", "lr=choice:0.05", "--sampler", "grid", "--epochs", "1", *REFIT)
    assert result.exit_code == 1
    assert "best " in result.output and "refit of trial 0 failed" in result.output
    assert "refit failed" in result.stderr and "no refit today" in result.stderr
    [parent], [trial] = study_runs(mlflow_client, experiment)
    [refit] = refits(mlflow_client, experiment)
    assert parent.info.status == "FINISHED" and trial.info.status == "FINISHED" and refit.info.status == "FAILED"
    assert "no refit today" in parent.data.tags["refit_failure"]
    assert "trials.csv" in {a.path for a in mlflow_client.list_artifacts(parent.info.run_id)}


def test_a_study_where_every_trial_failed_exits_1_and_fails_its_parent(invoke, mlflow_client, experiment):
    result = invoke("search", "--opt", "sgd", "--space", "lr=choice:1e30,1e31", "--sampler", "grid", "--epochs", "2",
                    *REFIT)
    assert result.exit_code == 1, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: no trial completed: 2 failed, the first (trial 0) with: the training loss became")
    assert "2 fail" in result.output, "the trials table is still shown"
    [parent], children = study_runs(mlflow_client, experiment)
    assert parent.info.status == "FAILED" and parent.data.tags["failure"].startswith("no trial completed")
    assert {c.info.status for c in children} == {"FAILED"} and not refits(mlflow_client, experiment)
    assert "trials.csv" in {a.path for a in mlflow_client.list_artifacts(parent.info.run_id)}


def test_child_runs_log_params_and_metrics_and_no_files_unless_child_artifacts(invoke, mlflow_client, experiment):
    args = ("search", "--space", "lr=choice:0.01,0.001", "--sampler", "grid", "--cv", "2", "--epochs", "2", *TINY)
    assert invoke(*args).exit_code == 0
    runs = runs_of(mlflow_client, experiment)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 + 2 * 2  # trials and their folds
    for child in children:
        assert mlflow_client.list_artifacts(child.info.run_id) == [], child.info.run_name
    folds = [c for c in children if "cv_fold" in c.data.params]
    assert all("opt.lr" in f.data.params and "val_loss" in f.data.metrics and "test_accuracy" in f.data.metrics
               for f in folds)
    assert [m.step for m in mlflow_client.get_metric_history(folds[0].info.run_id, "train_loss")] == [1, 2]
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert "optimization_history.png" in {a.path for a in mlflow_client.list_artifacts(parent.info.run_id)}

    assert invoke(*args, "--child-artifacts").exit_code == 0
    before = {r.info.run_id for r in runs}
    children = [r for r in runs_of(mlflow_client, experiment)
                if "mlflow.parentRunId" in r.data.tags and r.info.run_id not in before]
    assert len(children) == 6
    for child in children:
        files = {a.path for a in mlflow_client.list_artifacts(child.info.run_id)}
        assert "config.yaml" in files
        if "cv_fold" in child.data.params:
            assert {"learning_curves.png", "gradient_flow.png"} <= files


def test_shared_data_loads_a_dataset_once_and_gives_the_same_splits(monkeypatch):
    import optiflow.run
    from optiflow.config import RunConfig
    from optiflow.plugins import get_registry

    registry = get_registry()
    loaded = []
    build = optiflow.run.build

    def counting(component, *args, **kwargs):
        if component.kind == registry.get("dataset", "digits").kind:
            loaded.append(component.name)
        return build(component, *args, **kwargs)

    monkeypatch.setattr(optiflow.run, "build", counting)
    configs = [RunConfig.from_dict({"cv_folds": 3, "cv_fold": k, "model": "mlp:hidden=[8]"}) for k in range(3)]
    fresh = [optiflow.run.prepare(c, registry).splits for c in configs]
    assert loaded == ["digits"] * 3
    with optiflow.run.shared_data():
        shared = [optiflow.run.prepare(c, registry).splits for c in configs]
        optiflow.run.prepare(configs[0].replace(seed=1), registry)  # another seed: loaded again
    assert loaded == ["digits"] * 5
    for a, b in zip(fresh, shared):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))


def test_a_rerun_continues_toward_n_trials_and_a_complete_study_runs_none(invoke, tmp_path, mlflow_client, experiment):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = ("search", "--space", "lr=loguniform:1e-3:1e-1", "--sampler", "random", "--epochs", "1",
            "--storage", storage, "--study-name", "again", *TINY)
    assert invoke(*args, "--n-trials", "2").exit_code == 0
    assert invoke(*args, "--n-trials", "3").exit_code == 0
    again = invoke(*[a for a in args if a != "-q"], "--n-trials", "3")
    assert again.exit_code == 0, again.stderr
    assert "already has 3 finished trials" in again.output
    study = optuna.load_study(study_name="again", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    [parent], children = study_runs(mlflow_client, experiment)
    assert parent.info.status == "FINISHED"
    assert sorted(int(c.data.params["optuna.trial_number"]) for c in children) == [0, 1, 2]


@pytest.mark.parametrize("recorded", [True, False], ids=["run-recorded-on-trial", "killed-before-recording"])
def test_a_stale_trial_is_failed_its_run_killed_and_retried_once(tmp_path, tracking_uri, experiment, mlflow_client,
                                                                recorded):
    """What a surviving worker does with the trial of a worker that died: the heartbeat machinery, in-process.
    A worker killed after opening its trial's run but before recording it on the trial (``recorded=False``)
    leaves a run found by its parent and trial number, and ended KILLED all the same."""
    import time

    from optiflow.search.workers import PARENT_ATTR, RUN_ATTR, heartbeat_interval, heartbeat_options, settle
    from optiflow.tracking import Tracker

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}", **heartbeat_options(1, tracking_uri))
    study = optuna.create_study(storage=storage, study_name="dead")
    assert heartbeat_interval(study) == 1
    parent = Tracker(tracking_uri, experiment).start(run_name="search")
    study.set_user_attr(PARENT_ATTR, parent)
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)})
    tracker = Tracker(tracking_uri, experiment)
    run_id = tracker.start(run_name="trial 0", parent_run_id=parent,
                           tags={"optuna.study_name": "dead", "optuna.trial_number": "0"})
    other = Tracker(tracking_uri, experiment).start(run_name="trial 7", parent_run_id=parent,
                                                    tags={"optuna.study_name": "dead", "optuna.trial_number": "7"})
    if recorded:
        trial.set_user_attr(RUN_ATTR, run_id)
    storage.record_heartbeat(trial._trial_id)  # ... and then its worker dies
    time.sleep(2.5)
    retried: list[int] = []

    def run_queued(n: int) -> None:
        for _ in range(n):
            queued = study.ask()
            retried.append(queued.number)
            study.tell(queued, 0.5)

    settle(study, run_queued, None)
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "COMPLETE"] and retried == [1]
    assert study.trials[1].params == study.trials[0].params
    assert study.trials[1].system_attrs["failed_trial"] == 0
    killed = mlflow_client.get_run(run_id)
    assert killed.info.status == "KILLED" and "no heartbeat for 2 s" in killed.data.tags["failure"]
    assert [mlflow_client.get_run(r).info.status for r in (parent, other)] == ["RUNNING", "RUNNING"]


def test_search_defaults_come_from_search_settings_alone(invoke, monkeypatch):
    """The flags, ``--config`` and ``settings_from`` all read SearchSettings' defaults: changing one there
    changes what a search without that flag runs with."""
    from optiflow.commands.search import settings_from
    from optiflow.config import RunConfig
    from optiflow.search.study import GIVEN, SearchSettings, given_defaults

    space = {"space": ["lr=loguniform:1e-4:1e-1"]}
    settings = settings_from(space, RunConfig())
    assert dataclasses.replace(settings, space=[]) == SearchSettings(space=[])
    assert settings_from({**space, "metric": "val_accuracy"}, RunConfig()).direction == "maximize"
    assert set(given_defaults()) == set(GIVEN)
    sampler = copy.copy(SearchSettings.__dataclass_fields__["sampler"])
    sampler.default = "random"
    monkeypatch.setitem(SearchSettings.__dataclass_fields__, "sampler", sampler)
    monkeypatch.setattr(SearchSettings, "n_trials", 3)
    assert settings_from(space, RunConfig()).n_trials == 3
    result = invoke("search", "--space", "lr=loguniform:1e-4:1e-1", "--print-config", store=False)
    assert result.exit_code == 0, result.stderr
    assert yaml.safe_load(result.output)["sampler"] == "random"


def test_a_retried_trial_whose_worker_died_before_recording_its_run_has_that_run_killed(tmp_path, tracking_uri,
                                                                                         experiment, mlflow_client):
    """Optuna's retry copies the dead trial's user attributes, its recorded run id included: the retried trial
    carries trial 0's (KILLED) run until its own run is recorded.  A worker killed between opening the retried
    trial's run and recording it left that run RUNNING: the stale-trial callback must find it by its tags."""
    import time

    from optiflow.search.workers import PARENT_ATTR, RUN_ATTR, heartbeat_options
    from optiflow.tracking import Tracker

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}", **heartbeat_options(1, tracking_uri))
    study = optuna.create_study(storage=storage, study_name="dead")
    parent = Tracker(tracking_uri, experiment).start(run_name="search")
    study.set_user_attr(PARENT_ATTR, parent)
    runs = []
    for number in range(2):  # trial 0 dies with its run recorded; its retry, trial 1, dies before recording
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)})
        assert trial.number == number
        runs.append(Tracker(tracking_uri, experiment).start(
            run_name=f"trial {number}", parent_run_id=parent,
            tags={"optuna.study_name": "dead", "optuna.trial_number": str(number)}))
        if number == 0:
            trial.set_user_attr(RUN_ATTR, runs[0])
        else:
            assert trial.user_attrs[RUN_ATTR] == runs[0]  # inherited from the trial it retries
        storage.record_heartbeat(trial._trial_id)  # ... and then its worker dies
        time.sleep(3)
        optuna.storages.fail_stale_trials(study)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]  # retried once only
    assert [mlflow_client.get_run(r).info.status for r in runs] == ["KILLED", "KILLED"]
    assert "trial 1 stopped" in mlflow_client.get_run(runs[1]).data.tags["failure"]


def test_a_cross_validated_trial_killed_before_recording_its_run_has_it_and_its_folds_killed(tmp_path, tracking_uri,
                                                                                             experiment, mlflow_client):
    """With --cv a trial's run holds its fold runs: a worker killed before recording the trial's run leaves both
    RUNNING; the trial's run is found by parent and trial number, its running fold with it, and both end KILLED
    (a fold run of the same trial number, whose parent is the trial's run, is not taken for a trial run)."""
    import time

    from optiflow.search.workers import PARENT_ATTR, heartbeat_options
    from optiflow.tracking import Tracker

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}", **heartbeat_options(1, tracking_uri))
    study = optuna.create_study(storage=storage, study_name="dead")
    parent = Tracker(tracking_uri, experiment).start(run_name="search")
    study.set_user_attr(PARENT_ATTR, parent)
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)})
    tags = {"optuna.study_name": "dead", "optuna.trial_number": "0"}
    cv_run = Tracker(tracking_uri, experiment).start(run_name="trial 0", parent_run_id=parent,
                                                     tags={**tags, "optiflow.kind": "cross-validation"})
    fold = Tracker(tracking_uri, experiment).start(run_name="trial 0 fold 0", parent_run_id=cv_run,
                                                   tags={**tags, "optiflow.cv_fold": "0"})
    storage.record_heartbeat(trial._trial_id)  # ... and then its worker dies
    time.sleep(3)
    optuna.storages.fail_stale_trials(study)
    assert [mlflow_client.get_run(r).info.status for r in (cv_run, fold, parent)] == ["KILLED", "KILLED", "RUNNING"]
