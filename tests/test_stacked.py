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
    hashes = []
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
        assert len(run.data.tags["optiflow.weights_sha256"]) == 64, "reproduce compares a fold's weights by it"
        hashes.append(run.data.tags["optiflow.data_sha256"])
    assert hashes[0] == reference.data.tags["optiflow.data_sha256"], "fold 0's data, stacked or alone"
    assert len(set(hashes)) == 3, "each fold trains on its own split"


class HookCalls:
    """Records the lifecycle hooks each fold sees."""

    from optiflow import hookimpl

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str | None]] = []

    @hookimpl
    def optiflow_check_run(self, run):
        self.calls.append(("check_run", run.config.cv_fold, None))

    @hookimpl
    def optiflow_run_end(self, run, status):
        self.calls.append(("run_end", run.config.cv_fold, status))


@pytest.mark.parametrize("values, reason", [
    ({"reg": ["l2:strength=1e-4"]}, "regularizers"),
    ({"model": "mlp:hidden=[24],batch_norm=before"}, "not a plain MLP"),  # not element-wise across the batch
    ({"model": "mlp:hidden=[24],dropout=0.2"}, "not a plain MLP"),  # draws random numbers per step
    ({"sched": "step:step_size=1"}, "a learning-rate scheduler"),
    ({"opt": "lbfgs"}, "not an element-wise first-order optimizer"),
    ({"batch_size": 383}, "not the same number of batches per epoch"),  # 1149 samples: 3 batches of 383, 1150: 4
])
def test_what_cannot_be_stacked_exactly_trains_one_by_one(tracking_uri, experiment, mlflow_client, plugin, values,
                                                           reason):
    """Each guard of why_not_stacked says no for its own reason (deleting one makes its case fail here), and
    train_folds then returns None before any hook is called or run logged."""
    from optiflow.plugins import get_plugin_manager, get_registry
    from optiflow.run import prepare
    from optiflow.stacked import why_not_stacked

    configs = fold_configs(tracking_uri, experiment, epochs=1, **values)
    runs = [prepare(config, get_registry()) for config in configs]
    assert reason in (why_not_stacked(runs, get_plugin_manager()) or "stacked")
    calls = HookCalls()
    plugin(calls, "hook-calls")
    assert train_folds(configs, parent_run_id=parent(mlflow_client, experiment), tags=[{}] * 5, params={}) is None
    assert calls.calls == []
    assert len(mlflow_client.search_runs([mlflow_client.get_experiment_by_name(experiment).experiment_id])) == 1


def test_a_plugin_starting_epochs_is_not_stacked(tracking_uri, experiment, plugin):
    """An epoch-start hook may change one fold's learning rate for that epoch: its folds train one by one."""
    from optiflow import hookimpl
    from optiflow.plugins import get_plugin_manager, get_registry
    from optiflow.run import prepare
    from optiflow.stacked import why_not_stacked

    class Starting:
        @hookimpl
        def optiflow_epoch_start(self, run, epoch):
            pass

    runs = [prepare(config, get_registry()) for config in fold_configs(tracking_uri, experiment, folds=2)]
    assert why_not_stacked(runs, get_plugin_manager()) is None
    plugin(Starting(), "starting")
    assert why_not_stacked(runs, get_plugin_manager()) == "a plugin implements optiflow_epoch_start"


def test_a_crash_while_training_stacked_surfaces(tracking_uri, experiment, mlflow_client, plugin):
    """Once the folds train stacked, what stops them is raised as training them one by one raises it (a
    diverging loss as a TrainingError, a raising hook as a PluginError naming it), every started fold sees
    optiflow_run_end FAILED, and no fold run is logged."""
    from optiflow import hookimpl
    from optiflow.errors import PluginError, TrainingError

    calls = HookCalls()
    plugin(calls, "hook-calls")
    diverging = fold_configs(tracking_uri, experiment, epochs=2, folds=3, opt="sgd:lr=1e12")
    with pytest.raises(TrainingError, match=r"the training loss became nan .*the 3 folds trained stacked"):
        train_folds(diverging, parent_run_id=parent(mlflow_client, experiment), tags=[{}] * 3, params={})
    assert calls.calls == [("check_run", k, None) for k in range(3)] + [("run_end", k, "FAILED") for k in range(3)]

    class Raising:
        @hookimpl
        def optiflow_epoch_end(self, run, epoch, metrics):
            raise RuntimeError("boom")

    plugin(Raising(), "raising-epoch-end")
    configs = fold_configs(tracking_uri, experiment, epochs=1, folds=3)
    with pytest.raises(PluginError, match="plugin 'raising-epoch-end' failed in optiflow_epoch_end: RuntimeError: "
                                          "boom") as raised:
        train_folds(configs, parent_run_id=parent(mlflow_client, experiment), tags=[{}] * 3, params={})
    assert raised.value.plugin == "raising-epoch-end"
    experiment_id = mlflow_client.get_experiment_by_name(experiment).experiment_id
    assert len(mlflow_client.search_runs([experiment_id])) == 2  # the two parents only


def test_a_fold_let_through_by_a_deleted_guard_crashes_instead_of_training_one_by_one(
        tracking_uri, experiment, mlflow_client, plugin, monkeypatch):
    """Every guard of why_not_stacked deleted: a batch-norm model reaches the stacked path, and its crash is
    raised (not the silent fold-by-fold fallback after optiflow_check_run had fired), every started fold sees
    optiflow_run_end FAILED, and no fold run is logged."""
    from optiflow import stacked

    calls = HookCalls()
    plugin(calls, "hook-calls")
    monkeypatch.setattr(stacked, "why_not_stacked", lambda runs, pm: None)
    configs = fold_configs(tracking_uri, experiment, epochs=1, folds=3, model="mlp:hidden=[24],batch_norm=before")
    with pytest.raises(AssertionError, match="refuses a model that is not a plain MLP"):
        train_folds(configs, parent_run_id=parent(mlflow_client, experiment), tags=[{}] * 3, params={})
    assert calls.calls == [("check_run", k, None) for k in range(3)] + [("run_end", k, "FAILED") for k in range(3)]
    experiment_id = mlflow_client.get_experiment_by_name(experiment).experiment_id
    assert len(mlflow_client.search_runs([experiment_id])) == 1  # the parent only


def test_folds_that_stop_training_alike_go_on_one_by_one_with_the_same_numbers(tracking_uri, experiment,
                                                                                 mlflow_client, plugin):
    """A hook stops fold 0 after its first epoch and halves fold 1's learning rate: the stacked training hands
    each fold its weights and optimizer state and the folds go on in the one loop, to the numbers of folds
    trained one by one from the start."""
    from optiflow import hookimpl

    class Diverging:
        @hookimpl
        def optiflow_epoch_end(self, run, epoch, metrics):
            if epoch == 1 and run.config.cv_fold == 0:
                run.request_stop("enough")
            if epoch == 1 and run.config.cv_fold == 1:
                for group in run.optimizer.param_groups:
                    group["lr"] *= 0.5

    plugin(Diverging(), "diverging")
    configs = fold_configs(tracking_uri, experiment, folds=3)
    parent_id = parent(mlflow_client, experiment)
    alone = [train(config, parent_run_id=parent_id, log_model=False, artifacts=False) for config in configs]
    stacked = train_folds(configs, parent_run_id=parent_id, tags=[{}] * 3, params={})
    assert stacked is not None, "the folds started stacked"
    assert [len(result.history["train_loss"]) for result in stacked] == [1, 3, 3]
    assert stacked[1].history["lr"] == pytest.approx([0.01, 0.005, 0.005])
    for one, many in zip(alone, stacked):
        assert (many.stop_reason, many.epochs) == (one.stop_reason, one.epochs)
        for key, values_alone in one.history.items():
            if key not in TIMINGS:
                assert many.history[key] == pytest.approx(values_alone, rel=1e-4, abs=1e-6), key
        assert many.metrics == pytest.approx(one.metrics, rel=1e-4, abs=1e-6)
    fold = mlflow_client.get_run(stacked[0].run_id)
    assert fold.data.tags["stopped_early"] == "enough" and fold.data.tags["stopped_epoch"] == "1"


def test_a_search_with_stacked_folds_scores_the_folds_it_logs(invoke, mlflow_client, experiment):
    result = invoke("search", "--space", "lr=choice:0.01,0.001", "--sampler", "random", "--sampler-seed", "1",
                    "--n-trials", "2", "--cv", "3", "--epochs", "2", "--metric", "val_accuracy",
                    "--model", "mlp:hidden=[16]", "--batch-size", "64", "--no-refit", "-q", "--no-reuse")
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


def test_one_run_and_k_stacked_runs_count_right_predictions_alike():
    """metrics.hits: a class index or a one-hot/mixed target, one run's (N, C) outputs or K runs' (K, N, C)."""
    import torch

    from optiflow.metrics import hits

    outputs = torch.tensor([[[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], [[0.6, 0.4], [0.2, 0.8], [0.5, 0.4]]])
    labels = torch.tensor([[1, 1, 0], [0, 1, 1]])
    mixed = torch.nn.functional.one_hot(labels, 2).float() * 0.7 + 0.15
    for targets in (labels, mixed):
        assert hits(outputs, targets).tolist() == [[True, False, False], [True, True, False]]
        assert [hits(outputs[j], targets[j]).sum().item() for j in range(2)] == [1, 2]


@pytest.mark.parametrize("settings", [
    {"lr": 0.01},
    {"lr": 0.003, "weight_decay": 0.01, "amsgrad": True},
    {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-6, "maximize": True},
])
@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_the_direct_fused_adam_step_updates_the_weights_and_state_bit_for_bit(kind, settings):
    import torch

    from optiflow.stacked import _FusedAdamStep

    torch.manual_seed(0)
    start = [torch.randn(5, 7, 3), torch.randn(5, 7)]
    plain = [t.clone().requires_grad_(True) for t in start]
    direct = [t.clone().requires_grad_(True) for t in start]
    reference = getattr(torch.optim, kind)(plain, fused=True, **settings)
    optimizer = getattr(torch.optim, kind)(direct, fused=True, **settings)
    step = _FusedAdamStep(optimizer)
    for i in range(4):
        grads = [torch.randn_like(t) for t in start]
        for params in (plain, direct):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        reference.step()
        step()
        if i == 0:
            assert step.groups is not None, "after its first step the optimizer is stepped directly"
        for a, b in zip(plain, direct):
            assert torch.equal(a, b)
            for key, value in reference.state[a].items():
                assert torch.equal(value, optimizer.state[b][key]), key


def test_the_direct_adam_step_gives_way_to_step_hooks_and_other_optimizers():
    import torch

    from optiflow.stacked import _FusedAdamStep

    params = [torch.zeros(3, requires_grad=True)]
    optimizer = torch.optim.Adam(params, fused=True)
    step, seen = _FusedAdamStep(optimizer), []
    params[0].grad = torch.ones(3)
    step()
    optimizer.register_step_post_hook(lambda *args: seen.append(1))
    step()
    assert seen == [1], "a step hook registered on the optimizer still runs"
    sgd = _FusedAdamStep(torch.optim.SGD(params, lr=0.1))
    sgd()
    sgd()
    assert sgd.groups is None and not sgd.direct
    assert torch.allclose(params[0].detach(), torch.full((3,), -0.002 - 0.2)), "SGD still steps, through its step()"
