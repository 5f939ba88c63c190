"""Metrics mean the same thing in every run: ``val_loss``/``test_loss``/``train_loss`` are the task's plain loss
(cross-entropy on hard labels, MSE) whatever the run trains with; ``train_objective`` is what it minimized."""

from __future__ import annotations

import pytest
import torch

from optiflow import hookimpl
from optiflow.commands.train import train
from optiflow.config import RunConfig


class Keep:
    """Keeps the finished run (its model and splits) for the test to recompute metrics from."""

    run = None

    @hookimpl
    def optiflow_run_end(self, run, status):
        self.run = run


def trained(tracking_uri, experiment, plugin, **values):
    keep = Keep()
    plugin(keep, f"keep-{len(values)}-{id(keep)}")
    base = {"model": "mlp:hidden=[16]", "batch_size": 64, "device": "cpu", "epochs": 2,
            "tracking_uri": tracking_uri, "experiment": experiment}
    result = train(RunConfig.from_dict({**base, **values}), log_model=False)
    return result, keep.run


def recomputed(run, x, y) -> float:
    """The plain cross-entropy of the final model on hard labels, computed here from scratch."""
    run.model.eval()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(run.model(x), y))


@pytest.mark.parametrize("training", [{"reg": "label-smoothing:epsilon=0.3"},
                                      {"loss": "cross-entropy:label_smoothing=0.3"},
                                      {"loss": "mse"},
                                      {"reg": "l2:strength=0.01"},
                                      {"reg": "mixup"}],
                         ids=["label-smoothing", "ce-smoothing-option", "mse-trained", "l2-penalty", "mixup"])
def test_validation_and_test_losses_are_the_plain_cross_entropy_whatever_the_training(
        tracking_uri, experiment, plugin, training):
    plain, plain_run = trained(tracking_uri, experiment, plugin)
    other, other_run = trained(tracking_uri, experiment, plugin, **training)
    for result, run in ((plain, plain_run), (other, other_run)):
        splits = run.splits
        assert result.history["val_loss"][-1] == pytest.approx(recomputed(run, splits.x_val, splits.y_val), rel=1e-5)
        assert result.metrics["test_loss"] == pytest.approx(recomputed(run, splits.x_test, splits.y_test), rel=1e-5)
    assert plain.history["train_objective"] == plain.history["train_loss"]
    if "mixup" in str(training):  # the plain cross-entropy on the mixed batches is what mixup minimizes
        assert other.history["train_objective"] == other.history["train_loss"]
    else:
        assert other.history["train_objective"] != other.history["train_loss"], "the objective is logged on its own"


def test_label_smoothing_no_longer_inflates_val_loss(tracking_uri, experiment, plugin):
    """The issue's case: with smoothing, val_loss read 0.73 against 0.31 without; now both are the plain loss."""
    plain, _ = trained(tracking_uri, experiment, plugin, epochs=5)
    smoothed, _ = trained(tracking_uri, experiment, plugin, epochs=5, reg="label-smoothing:epsilon=0.3")
    assert smoothed.history["train_objective"][-1] > smoothed.history["train_loss"][-1] + 0.1
    assert abs(smoothed.history["val_loss"][-1] - plain.history["val_loss"][-1]) < 0.25


def test_regression_losses_are_the_mean_squared_error(tracking_uri, experiment, plugin):
    result, run = trained(tracking_uri, experiment, plugin, data="linear", reg="l1:strength=0.01")
    run.model.eval()
    with torch.no_grad():
        mse = float(((run.model(run.splits.x_val).reshape(run.splits.y_val.shape) - run.splits.y_val) ** 2).mean())
    assert result.history["val_loss"][-1] == pytest.approx(mse, rel=1e-5)
    assert result.history["train_objective"][-1] > result.history["train_loss"][-1]
