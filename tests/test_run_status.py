"""The MLflow run status tells the truth: FINISHED, FAILED with a failure tag, KILLED on Ctrl-C."""

from __future__ import annotations

import pytest

from optiflow import hookimpl
from optiflow.config import RunConfig
from optiflow.errors import TrainingError
from optiflow.plugins import get_plugin_manager
from optiflow.runner import train

from conftest import runs_of


class Raise:
    def __init__(self, exc: BaseException, at_epoch: int = 2) -> None:
        self.exc, self.at_epoch = exc, at_epoch

    @hookimpl
    def optiflow_epoch_end(self, run, epoch, metrics):
        if epoch == self.at_epoch:
            raise self.exc


@pytest.fixture
def with_plugin():
    pm = get_plugin_manager()
    added = []

    def add(plugin):
        pm.register(plugin, name=f"test-{id(plugin)}")
        added.append(plugin)

    yield add
    for plugin in added:
        pm.unregister(plugin)


@pytest.mark.parametrize(
    "exc, status, error",
    [(RuntimeError("boom"), "FAILED", RuntimeError), (KeyboardInterrupt(), "KILLED", KeyboardInterrupt)],
)
def test_status_on_exception_keeps_logged_metrics(with_plugin, tracking_uri, experiment, mlflow_client, exc, status, error):
    with_plugin(Raise(exc, at_epoch=2))
    config = RunConfig(epochs=4, tracking_uri=tracking_uri, experiment=experiment)
    with pytest.raises(error):
        train(config)
    [run] = runs_of(mlflow_client, experiment)
    assert run.info.status == status
    assert "failure" in run.data.tags
    # epoch 1 was logged before the failure in epoch 2's end hook
    assert [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "train_loss")] == [1]


def test_nan_loss_fails_the_run_with_a_clear_message(tracking_uri, experiment, mlflow_client):
    config = RunConfig.from_dict(
        {"opt": "sgd", "lr": 1e30, "epochs": 3, "tracking_uri": tracking_uri, "experiment": experiment}
    )
    with pytest.raises(TrainingError, match="training loss became"):
        train(config)
    [run] = runs_of(mlflow_client, experiment)
    assert run.info.status == "FAILED"
    assert "training loss became" in run.data.tags["failure"]
