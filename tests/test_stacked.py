"""The folds of a cross-validated trial trained at once as one stacked model: the same numbers as training them
one by one, logged as the same child runs; anything that cannot be stacked exactly trains one by one."""

from __future__ import annotations

import pytest

from optiflow.commands.train import train
from optiflow.config import RunConfig
from optiflow.search.folds import STACKED_TAG, train_folds

#: per-epoch metrics that measure time, not training
TIMINGS = {"epoch_time", "samples_per_sec", "train_seconds"}


def fold_configs(tracking_uri: str, experiment: str, folds: int = 5, **values) -> list[RunConfig]:
    base = {"model": "mlp:hidden=[24]", "epochs": 3, "batch_size": 64, "opt": "adam:lr=0.01",
            "tracking_uri": tracking_uri, "experiment": experiment, **values}
    return [RunConfig.from_dict({**base, "cv_folds": folds, "cv_fold": fold, "run_name": f"fold {fold}"})
            for fold in range(folds)]


def parent(mlflow_client, experiment: str) -> str:
    from optiflow.tracking import Tracker

    tracker = Tracker(mlflow_client.tracking_uri, experiment)
    return tracker.start(run_name="trial")


@pytest.mark.parametrize("values", [
    {},  # digits' 5 training parts differ in size by one: the last batch is ragged (1149 vs 1150 samples)
    {"model": "mlp:hidden=[20,12],activation=tanh", "opt": "sgd:lr=0.05,momentum=0.9", "batch_size": 50},
    {"opt": "adamw:lr=0.003,weight_decay=0.01", "norm": "minmax", "batch_size": 128},
    {"loss": "cross-entropy:label_smoothing=0.1", "batch_size": 100},
    {"loss": "mse", "batch_size": 100},  # not the plain cross-entropy: each fold's own loss on its slice
])
def test_stacked_folds_give_the_numbers_of_folds_trained_one_by_one(tracking_uri, experiment, mlflow_client, values):
    configs = fold_configs(tracking_uri, experiment, **values)
    parent_id = parent(mlflow_client, experiment)
    alone = [train(config, parent_run_id=parent_id, log_model=False, artifacts=False) for config in configs]
    stacked = train_folds(configs, parent_run_id=parent_id, tags=[{}] * len(configs), params={})
    assert stacked is not None, "these folds can be stacked"
    for one, many in zip(alone, stacked):
        assert set(one.history) == set(many.history)
        for key, values_alone in one.history.items():
            if key not in TIMINGS:
                assert many.history[key] == pytest.approx(values_alone, rel=1e-4, abs=1e-6), key
        assert many.metrics == pytest.approx(one.metrics, rel=1e-4, abs=1e-6)
        assert many.epochs == one.epochs == 3


def test_stacked_folds_are_child_runs_with_their_params_and_metrics(tracking_uri, experiment, mlflow_client):
    configs = fold_configs(tracking_uri, experiment, folds=3)
    parent_id = parent(mlflow_client, experiment)
    alone = train(configs[0], parent_run_id=parent_id, log_model=False, artifacts=False)
    stacked = train_folds(configs, parent_run_id=parent_id, tags=[{"optiflow.cv_fold": str(k)} for k in range(3)],
                          params={"optuna.trial_number": 7})
    assert stacked is not None
    reference = mlflow_client.get_run(alone.run_id)
    for fold, result in enumerate(stacked):
        run = mlflow_client.get_run(result.run_id)
        assert run.info.status == "FINISHED" and run.info.run_name == f"fold {fold}"
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.tags["optiflow.cv_fold"] == str(fold) and run.data.tags[STACKED_TAG] == "3"
        assert set(run.data.params) == set(reference.data.params) | {"optuna.trial_number"}
        assert run.data.params["optuna.trial_number"] == "7"
        assert set(run.data.metrics) == set(reference.data.metrics)
        history = mlflow_client.get_metric_history(result.run_id, "val_accuracy")
        assert [m.step for m in history] == [1, 2, 3]
        assert [m.value for m in history] == result.history["val_accuracy"]
        assert run.data.metrics["test_accuracy"] == result.metrics["test_accuracy"]


@pytest.mark.parametrize("values", [
    {"reg": ["l2:strength=1e-4"]},  # a penalty hook: per step
    {"model": "mlp:hidden=[24],batch_norm=before"},  # not element-wise across the batch
    {"model": "mlp:hidden=[24],dropout=0.2"},  # draws random numbers per step
    {"sched": "step:step_size=1"},
    {"opt": "lbfgs"},
    {"batch_size": 383},  # 1149 samples make 3 batches of 383, 1150 make 4: not the same steps
])
def test_what_cannot_be_stacked_exactly_trains_one_by_one(tracking_uri, experiment, mlflow_client, values):
    configs = fold_configs(tracking_uri, experiment, epochs=1, **values)
    assert train_folds(configs, parent_run_id=parent(mlflow_client, experiment), tags=[{}] * 5, params={}) is None
    assert len(mlflow_client.search_runs([mlflow_client.get_experiment_by_name(experiment).experiment_id])) == 1


def test_folds_that_fail_stacked_log_nothing_and_train_one_by_one(tracking_uri, experiment, mlflow_client, plugin):
    """A diverging fold or a raising epoch hook: train_folds logs no fold run and says so (None), and the trial
    then trains fold by fold, which fails as it always did."""
    diverging = fold_configs(tracking_uri, experiment, epochs=2, opt="sgd:lr=1e12")
    assert train_folds(diverging, parent_run_id=parent(mlflow_client, experiment), tags=[{}] * 5, params={}) is None

    class Raising:
        from optiflow import hookimpl

        @hookimpl
        def optiflow_epoch_end(self, run, epoch, metrics):
            raise RuntimeError("boom")

    plugin(Raising(), "raising-epoch-end")
    configs = fold_configs(tracking_uri, experiment, epochs=1)
    assert train_folds(configs, parent_run_id=parent(mlflow_client, experiment), tags=[{}] * 5, params={}) is None
    experiment_id = mlflow_client.get_experiment_by_name(experiment).experiment_id
    assert len(mlflow_client.search_runs([experiment_id])) == 2  # the two parents only


def test_a_search_with_stacked_folds_scores_the_folds_it_logs(invoke, mlflow_client, experiment):
    result = invoke("search", "--space", "lr=choice:0.01,0.001", "--sampler", "random", "--sampler-seed", "1",
                    "--n-trials", "2", "--cv", "3", "--epochs", "2", "--metric", "val_accuracy",
                    "--model", "mlp:hidden=[16]", "--batch-size", "64", "--no-refit", "-q")
    assert result.exit_code == 0, result.stderr
    experiment_id = mlflow_client.get_experiment_by_name(experiment).experiment_id
    runs = mlflow_client.search_runs([experiment_id])
    trials = [r for r in runs if r.data.tags.get("optiflow.kind") == "cross-validation"]
    assert len(trials) == 2
    for trial in trials:
        folds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == trial.info.run_id]
        assert len(folds) == 3 and all(f.data.tags[STACKED_TAG] == "3" for f in folds)
        assert all(f.info.status == "FINISHED" for f in folds)
        mean = sum(f.data.metrics["val_accuracy"] for f in folds) / 3
        assert trial.data.metrics["cv_val_accuracy_mean"] == pytest.approx(mean)
