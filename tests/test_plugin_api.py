"""The public API plugin authors rely on beyond the hooks: the warm-up every scheduler gets, and
wrapping another registered component (``get_registry().get``, ``Component``, ``Option``), options that are
components (``Nested``), and what a run tells a plugin about itself (``run.role``, ``run.wants_artifacts``)."""

from __future__ import annotations

from typing import Annotated

import pytest
import torch
from torch import nn

from optiflow import OptiflowError, hookimpl
from optiflow.config import ComponentSpec, RunConfig
from optiflow.plan import plan
from optiflow.plugins import get_registry, registered_plugin
from optiflow.registry import Component, Nested, Option
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


def scaled(model, *, base: Annotated[Nested, "optimizer"] = "sgd", scale: float = 1.0):
    """Any registered optimizer with its options (an option that is a component), its learning rate scaled."""
    optimizer = base.build(model)
    for group in optimizer.param_groups:
        group["lr"] *= scale
    return optimizer


CLOSURE_CALLS: list[tuple[str, bool]] = []


class TwoLooks(torch.optim.SGD):
    """A SAM-like optimizer: it evaluates the closure twice per step and reads the loss it returns."""

    def step(self, closure=None):
        for _ in range(2):
            loss = closure()
            grads = all(p.grad is not None for group in self.param_groups for p in group["params"])
            CLOSURE_CALLS.append((type(loss.detach()).__name__, grads))
        return super().step()


class SubclassedAdam(torch.optim.Adam):
    """A subclass of torch.optim.Adam: stepped with the closure, as every optimizer but PyTorch's own."""

    def step(self, closure=None):
        CLOSURE_CALLS.append(("closure" if closure is not None else "none", True))
        return super().step(closure)


class BrokenStep(torch.optim.SGD):
    def step(self, closure=None):
        raise RuntimeError("the step broke")


def two_looks(model, *, lr: float = 0.1):
    """Two evaluations per step."""
    return TwoLooks(model.parameters(), lr=lr)


def subclassed_adam(model, *, lr: float = 0.01):
    """Adam, subclassed."""
    return SubclassedAdam(model.parameters(), lr=lr)


def broken_step(model, *, lr: float = 0.1):
    """An optimizer whose step raises."""
    return BrokenStep(model.parameters(), lr=lr)


class ApiPlugin:
    @hookimpl
    def optiflow_register_schedulers(self, register):
        register("api-halving", halving)

    @hookimpl
    def optiflow_register_optimizers(self, register):
        register("api-wrapped", wrapped)
        register("api-scaled", scaled)
        register("api-two-looks", two_looks)
        register("api-subclassed-adam", subclassed_adam)
        register("api-broken-step", broken_step)


@pytest.fixture
def api_plugin():
    LENGTHS.clear()
    CLOSURE_CALLS.clear()
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


NESTED = "api-scaled:base=[sgd:lr=0.2,momentum=0.5,nesterov=true],scale=0.5"


def test_an_option_may_be_a_component_with_its_own_options(api_plugin):
    option = next(o for o in get_registry().get("optimizer", "api-scaled").options if o.name == "base")
    assert (option.component_kind, option.type_name) == ("optimizer", "optimizer spec")
    resolved = plan(RunConfig.from_dict({"opt": NESTED}), get_registry())
    base = resolved.opt[1]["base"]
    assert isinstance(base, Nested) and base.name == "sgd"
    assert (base.options["momentum"], base.options["nesterov"], base.options["lr"]) == (0.5, True, 0.2)
    params = resolved.params()
    assert {k: v for k, v in params.items() if k.startswith("opt")} == {
        "opt": "api-scaled", "opt.base": "sgd", "opt.base.lr": 0.2, "opt.base.momentum": 0.5, "opt.base.dampening": 0.0,
        "opt.base.nesterov": True, "opt.base.weight_decay": 0.0, "opt.base.decay_bias": False, "opt.scale": 0.5}
    optimizer, _ = build_optimizer(resolved, nn.Linear(2, 1), TrainingLength(1, 1))
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["nesterov"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert str(ComponentSpec.parse(NESTED)) == NESTED, "the spec writes back as it reads"


def test_a_nested_component_is_written_in_yaml_as_a_mapping_and_its_default_is_typed(api_plugin):
    mapping = {"name": "api-scaled", "base": {"name": "momentum", "momentum": 0.8}}
    base = plan(RunConfig.from_dict({"opt": mapping}), get_registry()).opt[1]["base"]
    assert (base.name, base.options["momentum"]) == ("momentum", 0.8)
    default = plan(RunConfig.from_dict({"opt": "api-scaled"}), get_registry()).opt[1]["base"]
    assert isinstance(default, Nested) and default.name == "sgd", "the default spec is found and typed too"


@pytest.mark.parametrize("spec, message", [
    ("api-scaled:base=[sgd:momentun=0.9]",
     "optimizer 'api-scaled': option 'base': optimizer 'sgd' has no option 'momentun' (did you mean 'momentum'?)"),
    ("api-scaled:base=adamm", "optimizer 'api-scaled': option 'base': unknown optimizer 'adamm'. Did you mean 'adam'"),
    ("api-scaled:base=[sgd:lr=fast]", "option 'base': optimizer 'sgd': option 'lr' expects float, got 'fast'"),
    ("api-scaled:base=sgd:momentum=0.9,nesterov=true", "optimizer 'api-scaled' has no option 'nesterov'"),
])
def test_a_bad_nested_component_is_one_line_naming_both(api_plugin, spec, message):
    with pytest.raises(OptiflowError) as info:
        plan(RunConfig.from_dict({"opt": spec}), get_registry())
    assert message in str(info.value)


def test_lr_reaches_the_optimizer_a_wrapper_wraps_unless_the_wrapper_takes_it(api_plugin):
    def lr_of(opt: str) -> float:
        resolved = plan(RunConfig.from_dict({"opt": opt, "lr": 0.4}), get_registry())
        optimizer, _ = build_optimizer(resolved, nn.Linear(2, 1), TrainingLength(1, 1))
        return optimizer.param_groups[0]["lr"]

    assert lr_of("api-scaled:base=[sgd:momentum=0.9],scale=0.5") == pytest.approx(0.2), "--lr set sgd's lr"
    assert lr_of("api-scaled:base=[api-scaled:base=[adam:lr=0.1]]") == pytest.approx(0.4), "through two wrappers"
    assert lr_of("api-scaled") == pytest.approx(0.4), "the base's default spec gets it too"
    assert lr_of("api-wrapped:scale=0.5") == pytest.approx(0.2), "a wrapper that declares lr takes it itself"
    resolved = plan(RunConfig.from_dict({"opt": "api-scaled:base=[sgd:momentum=0.9]", "lr": 0.4}), get_registry())
    assert resolved.params()["opt.base.lr"] == 0.4 and "opt.lr" not in resolved.params()


@pytest.mark.parametrize("bracketed", [True, False])
def test_components_nest_up_to_a_limit_and_deeper_is_one_line_with_exit_2(api_plugin, bracketed, invoke):
    from optiflow.registry import MAX_NESTING

    def nested(levels: int) -> str:
        return "api-scaled:base=[" * levels + "sgd" + "]" * levels if bracketed else "api-scaled:base=" * levels + "sgd"

    deepest = plan(RunConfig.from_dict({"opt": nested(MAX_NESTING)}), get_registry())
    assert deepest.params()["opt" + ".base" * MAX_NESTING] == "sgd"
    result = invoke("train", "--opt", nested(2000), "--epochs", "1", "-q")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("Error: optimizer 'api-scaled': components nested too deep in option 'base' "
                                     f"(at most {MAX_NESTING} levels)")


@pytest.mark.parametrize("spec", ["mlp:activation=leaky-relu:negative_slope=0.1,hidden=[8]",
                                  "mlp:hidden=[8],activation=[leaky-relu:negative_slope=0.1]"])
def test_mlp_activation_takes_the_same_grammar_and_the_old_form(spec):
    resolved = plan(RunConfig.from_dict({"model": spec}), get_registry())
    params = resolved.params()
    assert (params["model.activation"], params["model.activation.negative_slope"]) == ("leaky-relu", 0.1)
    assert params["model.hidden"] == (8,)


def test_a_nested_component_is_searched_by_choice(api_plugin, invoke, mlflow_client, experiment):
    from helpers import runs_of

    result = invoke("search", "--opt", "api-scaled", "--space", "opt.base=choice:sgd,[momentum:momentum=0.5]",
                    "--sampler", "grid", "--model", "mlp:hidden=[8]", "--epochs", "1", "--no-refit", "-q")
    assert result.exit_code == 0, result.output
    trials = [r.data.params for r in runs_of(mlflow_client, experiment) if "mlflow.parentRunId" in r.data.tags]
    assert sorted((p["opt.base"], p.get("opt.base.momentum")) for p in trials) == [("momentum", "0.5"), ("sgd", "0.0")]


@pytest.mark.parametrize("command", [("train", "--data", "iris", "--batch-size", "150", "--val-split", "0", "-q"),
                                     ("lr-preview", "--steps-per-epoch", "1")], ids=["train", "lr-preview"])
def test_every_caller_keeps_the_step_contract(api_plugin, invoke, command):
    result = invoke(*command, "--opt", "api-two-looks", "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert CLOSURE_CALLS == [("Tensor", True), ("Tensor", True)], "a tensor loss with its gradients, twice"
    CLOSURE_CALLS.clear()
    assert invoke(*command, "--opt", "api-subclassed-adam", "--epochs", "1").exit_code == 0
    assert CLOSURE_CALLS == [("closure", True)], "a subclass of a torch.optim class gets the closure"


@pytest.mark.parametrize("command", [("train", "--data", "iris"), ("lr-preview", "--steps-per-epoch", "1")],
                         ids=["train", "lr-preview"])
def test_an_optimizer_failing_in_its_step_is_named_with_its_plugin(api_plugin, invoke, command):
    result = invoke(*command, "--opt", "api-broken-step", "--epochs", "1")
    assert result.exit_code == 1
    assert "plugin 'api-test' failed in optimizer 'api-broken-step': RuntimeError: the step broke" in result.output
    assert "Traceback" not in result.output


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
