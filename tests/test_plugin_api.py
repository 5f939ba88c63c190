"""The public API plugin authors rely on beyond the hooks: the warm-up every scheduler gets, and
wrapping another registered component (``get_registry().get``, ``Component``, ``Option``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optiflow import OptiflowError, hookimpl
from optiflow.config import RunConfig
from optiflow.plan import plan
from optiflow.plugins import get_registry, registered_plugin
from optiflow.registry import Component, Option
from optiflow.run import build_optimizer
from optiflow.schedule import Schedule, TrainingLength

LENGTHS: list[TrainingLength] = []


def halving(optimizer, length, *, every: int = 1):
    """Halve the learning rate every `every` epochs."""
    LENGTHS.append(length)
    return Schedule(torch.optim.lr_scheduler.StepLR(optimizer, every, 0.5), "epoch")


def wrapped(model, *, inner: str = "sgd", lr: float = 0.1, scale: float = 1.0):
    """Any registered optimizer, its learning rate multiplied by scale."""
    return get_registry().get("optimizer", inner).build(model, lr=lr * scale)


class ApiPlugin:
    @hookimpl
    def optiflow_register_schedulers(self, register):
        register("api-halving", halving)

    @hookimpl
    def optiflow_register_optimizers(self, register):
        register("api-wrapped", wrapped)


@pytest.fixture
def api_plugin():
    LENGTHS.clear()
    with registered_plugin(ApiPlugin(), name="api-test"):
        yield


def rates(config: RunConfig, epochs: int) -> list[float]:
    optimizer, schedule = build_optimizer(plan(config, get_registry()), nn.Linear(1, 1), TrainingLength(epochs, 3))
    seen = []
    for _ in range(epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return seen


def test_a_plugin_scheduler_gets_the_core_warmup(api_plugin):
    component = get_registry().get("scheduler", "api-halving")
    assert [o.name for o in component.options] == ["every", "warmup_epochs"]
    config = RunConfig.from_dict({"opt": "sgd:lr=0.3", "sched": "api-halving:warmup_epochs=2", "epochs": 5})
    assert rates(config, 5) == pytest.approx([0.1, 0.2, 0.3, 0.15, 0.075])
    assert LENGTHS[-1] == TrainingLength(3, 3), "the plugin schedules the training left after warm-up"
    plain = RunConfig.from_dict({"opt": "sgd:lr=0.3", "sched": "api-halving", "epochs": 3})
    assert rates(plain, 3) == pytest.approx([0.3, 0.15, 0.075])
    assert LENGTHS[-1] == TrainingLength(3, 3)


def test_a_plugin_scheduler_warmup_too_long_is_one_line(api_plugin):
    config = RunConfig.from_dict({"sched": "api-halving:warmup_epochs=3", "epochs": 3})
    with pytest.raises(OptiflowError, match="scheduler 'api-halving': warmup_epochs must be between 0 and epochs - 1"):
        rates(config, 3)


def test_a_component_wraps_another_through_the_public_api(api_plugin):
    inner: Component = get_registry().get("optimizer", "optimizers/momentum")
    assert inner.plugin == "optimizers" and inner.name == "momentum"
    momentum = next(o for o in inner.options if o.name == "momentum")
    assert isinstance(momentum, Option) and (momentum.type, momentum.default) == (float, 0.9)
    assert inner.resolve_options({"momentum": "0.5"})["momentum"] == 0.5
    with pytest.raises(OptiflowError, match="has no option 'momentun'"):
        inner.resolve_options({"momentun": 1})
    config = RunConfig.from_dict({"opt": "api-wrapped:inner=momentum,lr=0.2,scale=0.5", "epochs": 1})
    optimizer, _ = build_optimizer(plan(config, get_registry()), nn.Linear(2, 1), TrainingLength(1, 1))
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1) and optimizer.param_groups[0]["momentum"] == 0.9


class RoleAwareReport:
    """What a plugin writing its own artifact does: it records every run's role, and writes its file only on
    runs that want artifacts."""

    def __init__(self):
        self.seen: list[tuple[str, bool]] = []

    @hookimpl
    def optiflow_run_start(self, run):
        self.seen.append((run.role, run.wants_artifacts))

    @hookimpl
    def optiflow_run_end(self, run, status):
        if status == "FINISHED" and run.wants_artifacts:
            run.tracker.log_text(run.role, "role.txt")


ROLE_RUNS = {
    "train": (("train",), [("train", True)]),
    "compare": (("compare", "--vary", "lr=0.1,0.05"), [("compare-child", True)] * 2),
    "trial and refit": (("search", "--space", "lr=choice:0.1", "--sampler", "grid"),
                        [("search-trial", False), ("refit", True)]),
    "stacked folds": (("search", "--space", "lr=choice:0.1", "--sampler", "grid", "--cv", "2", "--no-refit"),
                      [("cv-fold", False)] * 2),
    "child artifacts": (("search", "--space", "lr=choice:0.1", "--sampler", "grid", "--cv", "2", "--no-refit",
                         "--child-artifacts"), [("cv-fold", True)] * 2),
}


@pytest.mark.parametrize("args, expected", ROLE_RUNS.values(), ids=ROLE_RUNS.keys())
def test_every_run_says_its_role_and_whether_it_wants_artifacts(args, expected, invoke, plugin, mlflow_client,
                                                                experiment):
    from helpers import runs_of

    report = RoleAwareReport()
    plugin(report, "role-report")
    result = invoke(*args, "--model", "mlp:hidden=[8]", "--epochs", "1", "-q")
    assert result.exit_code == 0, result.output
    assert report.seen == expected
    written = [r for r in runs_of(mlflow_client, experiment)
               if "role.txt" in {a.path for a in mlflow_client.list_artifacts(r.info.run_id)}]
    assert len(written) == sum(wants for _, wants in expected)
