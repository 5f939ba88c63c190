"""Every registered component of every family, taken from the live registry, builds and trains.

A component added later (built-in or by a plugin) is picked up here the day it lands.
Components that need particular data or options say so in the small tables below.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from optiflow.commands.train import train
from optiflow.config import RunConfig
from optiflow.errors import OptiflowError
from optiflow.plugins import DEFAULT_PLUGINS, get_registry
from optiflow.registry import KINDS
from optiflow.run import prepare

from dataset_files import DATASET_SPECS, write_all
from helpers import tracked_status

IMAGE_DATA = "digits:image=true"
MODEL_DATA = {"cnn": IMAGE_DATA, "lenet": "mnist:download=false"}
LOSS_DATA = {"mse": "linear"}
NORMALIZER_DATA = {"per-channel": IMAGE_DATA}
OPTIMIZER_EXPECTED_ERROR = {"sparse-adam": "sparse-adam needs sparse gradients"}
SCHEDULER_OPTIONS = {"cyclic": {"step_size_up": 3}, "cosine-restarts": {"first_cycle": 2}}


def names(kind: str) -> list[str]:
    return get_registry().names(kind)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_all(root)
    return root


def make_config(data_dir, **values) -> RunConfig:
    base = {"epochs": 2, "batch_size": 128, "device": "cpu", "seed": 0, "data_dir": str(data_dir)}
    return RunConfig.from_dict({**base, **values})


def prepared(data_dir, **values):
    return prepare(make_config(data_dir, **values), get_registry())


def train_one_step(run) -> float:
    """One optimizer step on the first training batch; asserts that it changed the model."""
    xb, yb = run.splits.x_train[:32], run.splits.y_train[:32]
    before = [p.detach().clone() for p in run.model.parameters()]
    run.model.train()

    def closure():
        run.optimizer.zero_grad()
        loss = run.loss_fn(run.model(xb), yb)
        loss.backward()
        return loss

    loss = float(run.optimizer.step(closure).detach())
    assert math.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, run.model.parameters())), "the step changed nothing"
    return loss


def test_every_family_is_populated():
    registry = get_registry()
    for kind in KINDS:
        assert registry.names(kind), kind
        for component in registry.select(kind):
            assert component.description and "\n" not in component.description, component.name


@pytest.mark.parametrize("name", names("dataset"))
def test_dataset_trains_a_step(name, data_dir):
    run = prepared(data_dir, data=DATASET_SPECS.get(name, name))
    assert len(run.splits.x_train) and len(run.splits.x_test)
    assert run.source.task in {"classification", "regression"}
    train_one_step(run)


@pytest.mark.parametrize("name", names("normalizer"))
def test_normalizer_trains_a_step(name, data_dir):
    run = prepared(data_dir, norm=name, data=NORMALIZER_DATA.get(name, "digits"))
    assert torch.isfinite(run.splits.x_train).all() and torch.isfinite(run.splits.x_test).all()
    assert isinstance(run.normalizer.state(), dict)
    train_one_step(run)


@pytest.mark.parametrize("name", names("augmentation"))
def test_augmentation_trains_a_step(name, data_dir):
    run = prepared(data_dir, data=IMAGE_DATA, model="cnn", aug=[name])
    component, options = run.plan.aug[0]
    transform = component.factory(**options)
    batch = run.splits.x_train[:16]
    augmented = torch.stack([transform(sample) for sample in batch])
    assert augmented.shape == batch.shape and torch.isfinite(augmented).all()
    run.splits.x_train = torch.cat([augmented, run.splits.x_train[16:]])
    train_one_step(run)


@pytest.mark.parametrize("name", names("augmentation"))
def test_augmentation_rejects_flat_inputs(name):
    transform = get_registry().get("augmentation", name).build()
    with pytest.raises(OptiflowError, match="needs image inputs"):
        transform(torch.zeros(64))


@pytest.mark.parametrize("name", names("model"))
def test_model_trains_a_step(name, data_dir):
    run = prepared(data_dir, model=name, data=MODEL_DATA.get(name, "digits"))
    assert run.model(run.splits.x_train[:3]).shape == (3, run.source.num_outputs)
    train_one_step(run)


@pytest.mark.parametrize("name", names("activation"))
def test_activation_trains_a_step_in_mlp_and_cnn(name, data_dir):
    run = prepared(data_dir, model=f"mlp:hidden=[16,16],activation={name}")
    train_one_step(run)
    run = prepared(data_dir, data=IMAGE_DATA, model=f"cnn:channels=[4,8],hidden=[16],activation={name}")
    train_one_step(run)


@pytest.mark.parametrize("name", names("loss"))
def test_loss_trains_a_step(name, data_dir):
    run = prepared(data_dir, loss=name, data=LOSS_DATA.get(name, "digits"))
    train_one_step(run)


@pytest.mark.parametrize("name", names("optimizer"))
def test_optimizer_trains_a_step(name, data_dir):
    if name in OPTIMIZER_EXPECTED_ERROR:
        with pytest.raises(OptiflowError, match=OPTIMIZER_EXPECTED_ERROR[name]):
            prepared(data_dir, opt=name)
        return
    run = prepared(data_dir, opt=name, model="mlp:hidden=[16]")
    train_one_step(run)


@pytest.mark.parametrize("name", names("initializer"))
def test_initializer_trains_a_step(name, data_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        run = prepared(data_dir, init=name, model="mlp:hidden=[16]")
    train_one_step(run)


@pytest.mark.parametrize("name", names("regularizer"))
def test_regularizer_trains_and_logs(name, data_dir, tracking_uri, experiment):
    config = make_config(data_dir, reg=[name], tracking_uri=tracking_uri, experiment=experiment,
                         model="mlp:hidden=[16]")
    result = train(config, log_model=False)
    assert tracked_status(result) == "FINISHED"
    assert math.isfinite(result.metrics["test_loss"])


@pytest.mark.parametrize("name", names("scheduler"))
def test_scheduler_trains(name, data_dir, tracking_uri, experiment):
    options = ",".join(f"{k}={v}" for k, v in SCHEDULER_OPTIONS.get(name, {}).items())
    config = make_config(data_dir, sched=f"{name}:{options}" if options else name, tracking_uri=tracking_uri,
                         experiment=experiment, model="mlp:hidden=[16]", epochs=3)
    result = train(config, log_model=False)
    assert tracked_status(result) == "FINISHED"
    assert all(lr > 0 and math.isfinite(lr) for lr in result.history["lr"])


def test_builtin_registry_has_every_family():
    from optiflow.slots import FAMILIES

    registry = get_registry()
    builtin = {module.rsplit(".", 1)[-1] for module in DEFAULT_PLUGINS}
    for family in FAMILIES:
        for kind in family.kinds:
            assert registry.select(kind), f"no {kind}"
            assert [c for c in registry.select(kind) if c.plugin in builtin], f"no built-in {kind}"
