"""The training loop (optiflow/loop.py): a step per batch, schedulers stepped per batch or per epoch,
the NaN check, evaluation metrics, per-step logging, augmentation on training samples only."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from optiflow import hookimpl
from optiflow.commands.train import train
from optiflow.config import RunConfig
from optiflow.data import split
from optiflow.errors import TrainingError
from optiflow.plugins import get_plugin_manager, get_registry
from optiflow.schedule import TrainingLength

from helpers import metric_history, runs_of, tracked_status


def config(tracking_uri, experiment, **values) -> RunConfig:
    base = {"model": "mlp:hidden=[16]", "batch_size": 64, "device": "cpu", "tracking_uri": tracking_uri,
            "experiment": experiment}
    return RunConfig.from_dict({**base, **values})


def schedule_interval(name: str) -> str:
    """``step`` or ``epoch``: how often the loop steps the built-in scheduler ``name``."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    return get_registry().get("scheduler", name).build(optimizer, TrainingLength(3, 5)).interval

def test_nan_loss_stops_within_the_epoch_and_keeps_what_was_logged(tracking_uri, experiment, mlflow_client, plugin):
    class Explode:
        """Turn the learning rate huge from epoch 2 on: the loss becomes non-finite a few steps later."""

        @hookimpl
        def optiflow_epoch_start(self, run, epoch):
            if epoch == 2:
                for group in run.optimizer.param_groups:
                    group["lr"] = 1e30

    plugin(Explode(), "explode")
    with pytest.raises(TrainingError, match=r"training loss became (nan|inf) at step \d+ \(epoch 2") as info:
        train(config(tracking_uri, experiment, opt="sgd", epochs=3, batch_size=8))
    [run] = runs_of(mlflow_client, experiment)
    assert run.info.status == "FAILED"
    assert "training loss became" in run.data.tags["failure"]
    assert f"run {run.info.run_id} ended FAILED" in str(info.value)
    assert [step for step, _ in metric_history(mlflow_client, run.info.run_id, "val_loss")] == [1]
    steps_per_epoch = -(-int(run.data.params["data.n_train"]) // 8)
    stopped_at = int(str(info.value).split("at step ")[1].split()[0])
    assert steps_per_epoch < stopped_at < steps_per_epoch + 64, "checked every 16 steps, not once per epoch"


@pytest.mark.parametrize("options", [{"lr": 1e6}, {"opt": "sgd", "lr": 2.0}], ids=["adam-lr-1e6", "sgd-lr-2"])
def test_a_finite_divergence_fails_the_run_saying_so(tracking_uri, experiment, mlflow_client, options):
    with pytest.raises(TrainingError, match=r"training loss diverged to \S+ at step \d+ .* over 10000 times its first"):
        train(config(tracking_uri, experiment, epochs=6, model="mlp", batch_size=32, **options))
    [run] = runs_of(mlflow_client, experiment)
    assert run.info.status == "FAILED" and "diverged" in run.data.tags["failure"]


def test_a_loss_that_falls_or_spikes_once_is_not_divergence_three_high_checks_are():
    from optiflow.loop import LossCheck

    check = LossCheck(SimpleNamespace(step=1, epoch=1, lr=0.1))  # type: ignore[arg-type]
    check.baseline = 2.3
    total = 0.0
    for index, window in enumerate([2.0, 1.0, 3e4, 0.5, 3e4, 3e4, 0.4, 3e4, 3e4], 1):
        total += window * 16
        check(torch.tensor(total), 16 * index)  # each check sees 16 new samples of mean loss ``window``
    with pytest.raises(TrainingError, match="diverged to 3e[+]04"):
        total += 3e4 * 16
        check(torch.tensor(total), 16 * 10)


class CountSteps:
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.grads_present: list[bool] = []

    @hookimpl
    def optiflow_after_backward(self, run, step):
        self.steps.append(step)
        self.grads_present.append(all(p.grad is not None for p in run.model.parameters()))


def test_after_backward_runs_once_per_step_with_gradients(tracking_uri, experiment):
    counter = CountSteps()
    pm = get_plugin_manager()
    pm.register(counter, name="test-count-steps")
    try:
        config = RunConfig(epochs=2, batch_size=256, tracking_uri=tracking_uri, experiment=experiment)
        train(config, log_model=False)
    finally:
        pm.unregister(counter)
    batches_per_epoch = -(-1293 // 256)  # 1,797 digits less 20% test less 10% validation
    assert counter.steps == list(range(1, 2 * batches_per_epoch + 1))
    assert all(counter.grads_present)


def test_regression_uses_mse_and_reports_rmse(invoke, mlflow_client, experiment):
    from optiflow.data import DataSource

    def line(ctx, *, n: int = 200):
        """y = 3x + 2."""
        x = torch.linspace(-1, 1, n).unsqueeze(1)
        return DataSource(x, (3 * x + 2).squeeze(1), "regression")

    registry = get_registry()
    registry.registrar("data", "test")("test-line", line)
    try:
        result = invoke("train", "--data", "test-line", "--model", "mlp:hidden=[8]", "--epochs", "3", "-q")
        assert result.exit_code == 0, result.stderr
    finally:
        registry.remove_plugin("test")
    [run] = runs_of(mlflow_client, experiment)
    metrics = run.data.metrics
    assert {"test_rmse", "test_r2", "test_loss"} <= set(metrics)
    # the loss left unset is MSE for regression: the test loss is the square of the test RMSE
    assert metrics["test_loss"] == pytest.approx(metrics["test_rmse"] ** 2, rel=1e-4)
    assert metrics["val_loss"] == pytest.approx(metrics["val_rmse"] ** 2, rel=1e-4)
    assert "test_accuracy" not in run.data.metrics


def test_log_step_loss_logs_every_batch_and_matches_the_epoch_mean(invoke, mlflow_client, experiment):
    args = ("train", "--epochs", "2", "--batch-size", "500", "--val-split", "0", "--no-shuffle", "-q")
    assert invoke(*args, "--log-step-loss").exit_code == 0
    [run] = runs_of(mlflow_client, experiment)
    steps = mlflow_client.get_metric_history(run.info.run_id, "train_loss_step")
    assert [m.step for m in steps] == [1, 2, 3, 4, 5, 6]  # 1,437 training samples -> 3 batches per epoch
    first_epoch = mlflow_client.get_metric_history(run.info.run_id, "train_loss")[0].value
    sizes = [500, 500, 437]
    assert first_epoch == pytest.approx(sum(m.value * n for m, n in zip(steps[:3], sizes)) / 1437, rel=1e-5)
    assert invoke(*args, "--no-reuse").exit_code == 0  # trains: the run above would be reused (the same key)
    assert mlflow_client.get_metric_history(runs_of(mlflow_client, experiment)[1].info.run_id, "train_loss_step") == []


def test_augmentation_runs_per_training_sample_and_never_at_evaluation(tracking_uri, experiment, monkeypatch):
    registry = get_registry()
    component = registry.get("augmentation", "hflip")
    calls = []

    def counting_factory(**options):
        transform = component.factory(**options)
        return lambda sample: calls.append(sample.shape) or transform(sample)

    monkeypatch.setitem(registry.components["augmentation"], "hflip", dataclasses.replace(component, factory=counting_factory))
    cfg = config(tracking_uri, experiment, data="digits:image=true", model="linear", aug=["hflip"], epochs=2)
    result = train(cfg, log_model=False)
    n_train = len(split(registry.get("dataset", "digits").build(None), cfg.val_split, cfg.test_split, 0).x_train)
    assert calls and all(shape == (1, 8, 8) for shape in calls)
    # every training sample each epoch, and the one sample the augmentation is tried on before the run opens;
    # no validation or test sample
    assert len(calls) == 2 * n_train + 1
    assert tracked_status(result) == "FINISHED"


def test_per_batch_schedulers_step_every_batch(tracking_uri, experiment):
    cfg = config(tracking_uri, experiment, data="iris", sched="onecycle", opt="sgd:lr=0.1", epochs=3, batch_size=16,
                 val_split=0.0)
    result = train(cfg, log_model=False)
    lrs = result.history["lr"]
    assert lrs[0] == pytest.approx(0.1 / 25) and lrs[1] > lrs[0] and lrs[2] < lrs[1]
    assert schedule_interval("cyclic") == "step"
    assert schedule_interval("cosine") == "epoch"


def trained_weights(opt: str) -> list[torch.Tensor]:
    """The weights of a small MLP after 8 steps of ``training_step`` with ``opt``."""
    import optiflow.loop
    from optiflow import distributed
    from optiflow.run import prepare

    run = prepare(RunConfig.from_dict({"model": "mlp:hidden=[16]", "opt": opt, "device": "cpu"}), get_registry())
    step = optiflow.loop.training_step(run, get_plugin_manager(), distributed.current())
    for start in range(0, 256, 32):
        step(run.splits.x_train[start:start + 32], run.splits.y_train[start:start + 32])
    return [p.detach().clone() for p in run.model.parameters()]


@pytest.mark.parametrize("opt", ["adam", "sgd:momentum=0.9", "rmsprop"])
def test_stepping_without_a_closure_trains_exactly_as_with_one(opt, monkeypatch):
    import optiflow.loop
    from optiflow.optim import first_order

    def weights(closure_free: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(optiflow.loop, "first_order", lambda optimizer: closure_free)
        return trained_weights(opt)

    assert all(torch.equal(a, b) for a, b in zip(weights(True), weights(False)))
    monkeypatch.undo()
    assert first_order(torch.optim.Adam([nn.Parameter(torch.zeros(1))]))
    assert not first_order(torch.optim.LBFGS([nn.Parameter(torch.zeros(1))]))

    class Custom(torch.optim.Adam):
        pass

    assert not first_order(Custom([nn.Parameter(torch.zeros(1))])), "a subclass may evaluate the closure otherwise"


@pytest.mark.parametrize("opt", ["adam", "sgd:momentum=0.9"])
def test_the_one_step_path_under_a_grad_scaler_trains_as_without(opt, monkeypatch):
    """The GradScaler fp16 needs is always in the step, a no-op when disabled: enabled (scale by 2**16, unscale
    before the step: exact in fp32) it gives the same weights, and its scale is what it stepped with."""
    from optiflow.setup import Setup

    scalers: list[torch.amp.GradScaler] = []
    real = torch.amp.GradScaler

    def recording(*args, **kwargs):
        scalers.append(real(*args, **kwargs))
        return scalers[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", recording)

    def weights(scaled: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(Setup, "grad_scaler", property(lambda self: scaled))
        return trained_weights(opt)

    assert all(torch.equal(a, b) for a, b in zip(weights(True), weights(False)))
    assert [s.is_enabled() for s in scalers] == [True, False]
    assert scalers[0].get_scale() == 2.0 ** 16
