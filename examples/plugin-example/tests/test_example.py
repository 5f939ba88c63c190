"""The example plugin's own tests: Lion against the paper's update rule, the data, and a run with all three.

Run them with ``python -m pytest`` in examples/plugin-example once optiflow is installed.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from mlflow.tracking import MlflowClient
from optiflow_example import plugin
from optiflow_example.datasets import make_spirals
from optiflow_example.ema import WeightEMA
from optiflow_example.lion import Lion

from optiflow.commands.train import train
from optiflow.config import RunConfig
from optiflow.data import DataContext
from optiflow.plan import plan
from optiflow.plugins import get_registry, registered_plugin


def test_lion_follows_the_papers_update_rule():
    lr, beta1, beta2, wd = 0.1, 0.9, 0.99, 0.5
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    optimizer = Lion([param], lr=lr, betas=(beta1, beta2), weight_decay=wd)
    theta, momentum = param.detach().clone(), torch.zeros(3)
    for grad in (torch.tensor([0.3, -0.1, 0.0]), torch.tensor([-1.0, -0.2, 0.4])):
        param.grad = grad.clone()
        optimizer.step()
        update = torch.sign(beta1 * momentum + (1 - beta1) * grad)
        theta = theta - lr * (update + wd * theta)
        momentum = beta2 * momentum + (1 - beta2) * grad
        assert torch.allclose(param.detach(), theta)
    assert torch.allclose(optimizer.state[param]["exp_avg"], momentum)


def test_lion_weight_decay_is_decoupled_from_the_gradient():
    param = torch.nn.Parameter(torch.tensor([2.0, -4.0]))
    optimizer = Lion([param], lr=0.1, weight_decay=0.5)
    param.grad = torch.zeros(2)
    optimizer.step()
    assert torch.allclose(param.detach(), torch.tensor([2.0, -4.0]) * (1 - 0.1 * 0.5))


def test_lion_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="betas"):
        Lion([torch.nn.Parameter(torch.zeros(1))], betas=(0.9, 1.0))


def test_spirals_are_balanced_and_seeded():
    x, y = make_spirals(300, arms=3, seed=1)
    assert x.shape == (300, 2) and x.dtype == torch.float32
    assert torch.bincount(y).tolist() == [100, 100, 100]
    assert torch.equal(make_spirals(300, arms=3, seed=1)[0], x)
    assert not torch.equal(make_spirals(300, arms=3, seed=2)[0], x)


def test_ema_tracks_the_average_of_the_weights():
    model = torch.nn.Linear(2, 1)

    class FakeRun:
        pass

    run = FakeRun()
    run.model = model
    ema = WeightEMA(decay=0.5)
    ema.optiflow_run_start(run)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.optiflow_after_step(run, step=1)
    decay = min(0.5, 2 / 11)
    assert torch.allclose(ema.shadow[0], decay * start + (1 - decay) * (start + 1.0))
    with ema.swapped_in():
        assert torch.allclose(model.weight, ema.shadow[0])
    assert torch.allclose(model.weight, start + 1.0)


@pytest.fixture
def example_plugin():
    """The plugin registered for one test, as if it were installed (a no-op when it is)."""
    with registered_plugin(plugin, name="example"):
        yield


def test_lion_trains_on_spirals_with_ema(example_plugin, tmp_path):
    store = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = RunConfig.from_dict({
        "data": "spirals:n=400", "model": "mlp:hidden=[32,32]", "opt": "lion:lr=0.003", "reg": ["ema:decay=0.9"],
        "epochs": 8, "tracking_uri": store, "experiment": "plugin-example",
    })
    result = train(config, log_model=False)
    assert result.epochs == 8 and result.stop_reason is None
    assert MlflowClient(store).get_run(result.run_id).info.status == "FINISHED"
    assert len(result.history["ema_val_accuracy"]) == 8
    assert result.history["val_accuracy"][-1] > 0.6, "Lion learns the spirals"


def test_its_adam_is_a_deliberate_reuse_of_a_builtin_name(example_plugin, monkeypatch):
    monkeypatch.setenv("OPTIFLOW_STRICT_PLUGINS", "1")  # no clash: strict mode has nothing to refuse
    registry = get_registry()
    assert registry.get("optimizer", "adam").plugin == "optimizers", "the bare name stays the built-in's"
    mine = registry.get("optimizer", "example/adam")
    assert (mine.plugin, mine.namespaced_only) == ("example", True)
    assert not [line for owner, line in registry.clashes if owner == "example"]
    optimizer = mine.build(torch.nn.Linear(3, 2), weight_decay="0.1")
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0], "the bias is spared"


def test_noisy_labels_wraps_any_dataset_given_as_an_option(example_plugin, tmp_path):
    noisy = get_registry().get("dataset", "noisy-labels")
    clean = get_registry().get("dataset", "spirals").build(DataContext(tmp_path, 0), n=1000)
    source = noisy.build(DataContext(tmp_path, 0), base="[spirals:n=1000]", flip="0.3")
    assert torch.equal(source.x, clean.x)
    assert 0.25 < float((source.y != clean.y).float().mean()) < 0.35
    params = plan(RunConfig.from_dict({"data": "noisy-labels:base=[spirals:n=200,arms=3],flip=0.1"}),
                  get_registry()).params()
    assert (params["data.base"], params["data.base.arms"], params["data.flip"]) == ("spirals", 3, 0.1)


@pytest.mark.parametrize("role, artifacts", [("train", True), ("search-trial", False)])
def test_the_confusion_matrix_is_written_only_where_the_run_wants_artifacts(example_plugin, tmp_path, role,
                                                                           artifacts):
    store = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = RunConfig.from_dict({"data": "spirals:n=200", "model": "mlp:hidden=[16]", "opt": "example/adam",
                                  "reg": ["confusion-matrix"], "epochs": 2, "tracking_uri": store,
                                  "experiment": "plugin-example"})
    result = train(config, log_model=False, artifacts=artifacts, role=role)
    files = {a.path for a in MlflowClient(store).list_artifacts(result.run_id)}
    assert ("confusion_matrix.json" in files) == artifacts
    if artifacts:
        text = MlflowClient(store).download_artifacts(result.run_id, "confusion_matrix.json", str(tmp_path))
        written = json.loads(open(text).read())
        assert written["role"] == "train" and sum(map(sum, written["matrix"])) == 40, "the 40 test samples"
