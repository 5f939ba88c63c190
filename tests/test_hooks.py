"""Every hook spec is documented, listed in docs/plugins.md with its exact signature, and proven to work.

One tiny run with a plugin that registers one component of every family and
records every lifecycle hook feeds the ``test_hook_<name>`` tests below.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from pathlib import Path

import pytest
import torch

from optiflow import hookimpl, hookspecs
from optiflow.config import RunConfig
from optiflow.errors import PluginError
from optiflow.plugins import registered_plugin
from optiflow.schedule import Schedule

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
HOOKS = {name: getattr(hookspecs, name) for name in dir(hookspecs) if name.startswith("optiflow_")}
EPOCHS = 3
STOP_AT = 2


def signature(name: str) -> str:
    return f"{name}({', '.join(inspect.signature(HOOKS[name]).parameters)})"


def test_every_hook_spec_has_a_docstring():
    for name, spec in HOOKS.items():
        doc = inspect.getdoc(spec) or ""
        assert len(doc) > 40 and "Return" in doc, f"{name} needs a docstring saying when it runs and what it returns"


def test_every_hook_signature_is_in_the_docs():
    text = DOCS.read_text()
    missing = [signature(name) for name in HOOKS if f"`{signature(name)}`" not in text]
    assert not missing, f"docs/plugins.md lacks the exact signatures {missing}"


def test_every_hook_has_a_test():
    tests = {name for name in globals() if name.startswith("test_hook_")}
    missing = [name for name in HOOKS if f"test_hook_{name.removeprefix('optiflow_')}" not in tests]
    assert not missing, f"hooks without a test_hook_<name>: {missing}"


def test_every_documented_hook_exists():
    documented = set(re.findall(r"^#+ `(optiflow_\w+)\(", DOCS.read_text(), flags=re.M))
    assert documented == set(HOOKS), "docs/plugins.md documents hooks that do not exist, or misses some"


class Recorder:
    """The per-run object behind ``--reg hooks-recorder``: records every lifecycle hook and acts through some."""

    instances: list[Recorder] = []

    def __init__(self, *, penalty_weight: float = 1000.0) -> None:
        self.penalty_weight = penalty_weight
        self.events: list[tuple] = []
        self.grads: list[float] = []
        self.changed_by_step: list[bool] = []
        Recorder.instances.append(self)

    @staticmethod
    def first_bias(run):
        return run.model[1].bias

    @staticmethod
    def last_weight(run):
        return run.model[-1].weight

    @hookimpl
    def optiflow_metric_names(self, run):
        return ["val_hook_metric"]

    @hookimpl
    def optiflow_check_run(self, run):
        self.events.append(("check_run", run.tracker, len(run.splits.x_train)))
        self.metric_names = run.metric_names

    @hookimpl
    def optiflow_run_start(self, run):
        self.events.append(("run_start", run.tracker.run_id, run.epoch))
        self.last_weight_at_start = self.last_weight(run).detach().clone()

    @hookimpl
    def optiflow_epoch_start(self, run, epoch):
        self.events.append(("epoch_start", epoch, run.model.training))

    @hookimpl
    def optiflow_train_batch(self, run, x, y):
        import torch

        self.events.append(("train_batch", run.step, x.device.type, y.dtype))
        return x, torch.nn.functional.one_hot(y, 3).float()

    @hookimpl
    def optiflow_penalty(self, run):
        self.events.append(("penalty", run.step, tuple(run.last_outputs.shape)))
        return self.penalty_weight * self.first_bias(run).sum()

    @hookimpl
    def optiflow_after_backward(self, run, step):
        self.events.append(("after_backward", step))
        self.grads.append(float(self.first_bias(run).grad.mean()))
        self.last_weight(run).grad.zero_()
        self.before_step = self.first_bias(run).detach().clone()

    @hookimpl
    def optiflow_after_step(self, run, step):
        self.events.append(("after_step", step))
        self.changed_by_step.append(not self.first_bias(run).detach().equal(self.before_step))

    @hookimpl
    def optiflow_validation_end(self, run, epoch, metrics):
        self.events.append(("validation_end", epoch, "val_loss" in metrics, run.lr))
        metrics["val_hook_metric"] = 10.0 * epoch

    @hookimpl
    def optiflow_epoch_end(self, run, epoch, metrics):
        self.events.append(("epoch_end", epoch, metrics.get("val_hook_metric"), run.lr))
        metrics["epoch_hook_metric"] = float(epoch)
        if epoch == STOP_AT:
            run.request_stop("the hook asked to stop")

    @hookimpl
    def optiflow_run_end(self, run, status):
        self.events.append(("run_end", status, run.epoch))
        self.last_weight_at_end = self.last_weight(run).detach().clone()

    def names(self, hook: str) -> list[tuple]:
        return [event for event in self.events if event[0] == hook]


def blobs(ctx, *, n: int = 120):
    """Three Gaussian blobs in 4-D."""
    import torch

    from optiflow.data import DataSource

    generator = torch.Generator().manual_seed(ctx.seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 4, generator=generator) + 3.0 * torch.nn.functional.one_hot(y, 4).float()
    return DataSource(x, y, "classification", num_classes=3)


class FamilyPlugin:
    """One component per family, each recording that the core called it as documented."""

    calls: dict[str, list] = {}

    @hookimpl
    def optiflow_register_data(self, register):
        register("hooks-blobs", blobs)

    @hookimpl
    def optiflow_train_batch(self, y):
        FamilyPlugin.calls.setdefault("train_batch", []).append((y.dtype, tuple(y.shape)))

    @hookimpl
    def optiflow_register_models(self, register):
        def two_layer(input_shape, num_outputs, *, width: int = 8):
            """A two-layer perceptron."""
            from torch import nn

            FamilyPlugin.calls.setdefault("model", []).append((input_shape, num_outputs, width))
            return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], width), nn.Tanh(),
                                 nn.Linear(width, num_outputs))

        register("hooks-net", two_layer)

    @hookimpl
    def optiflow_register_optimizers(self, register):
        def marked_sgd(model, *, lr: float = 0.1):
            """SGD that remembers it was built by this plugin."""
            import torch

            optimizer = torch.optim.SGD(model.parameters(), lr=lr)
            FamilyPlugin.calls.setdefault("optimizer", []).append(optimizer)
            return optimizer

        register("hooks-sgd", marked_sgd)

    @hookimpl
    def optiflow_register_regularizers(self, register):
        register("hooks-recorder", Recorder)

    @hookimpl
    def optiflow_register_schedulers(self, register):
        def halving(optimizer, length, *, factor: float = 0.5):
            """Multiply the learning rate by factor after every epoch."""
            import torch

            FamilyPlugin.calls.setdefault("scheduler", []).append(length)
            return Schedule(torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=factor), "epoch")

        register("hooks-halving", halving)

    @hookimpl
    def optiflow_register_initializers(self, register):
        def counting(*, value: float = 0.0):
            """Set every bias to value and count the layers."""

            def apply(layer):
                FamilyPlugin.calls.setdefault("initializer", []).append(type(layer).__name__)
                layer.bias.data.fill_(value)

            return apply

        register("hooks-init", counting)


@pytest.fixture(scope="module")
def hooked_run(tracking_uri):
    """One 3-epoch run on the plugin's components (stopped after epoch 2 by a hook)."""
    from mlflow.tracking import MlflowClient

    from optiflow.commands.train import train

    Recorder.instances.clear()
    FamilyPlugin.calls.clear()
    config = RunConfig.from_dict({
        "data": "hooks-blobs:n=150", "model": "hooks-net:width=6", "opt": "hooks-sgd:lr=0.05",
        "sched": "hooks-halving", "init": "hooks-init:value=0.25", "reg": ["hooks-recorder"],
        "epochs": EPOCHS, "batch_size": 32, "tracking_uri": tracking_uri, "experiment": "test-hooks",
    })
    with registered_plugin(FamilyPlugin(), name="hooks-test-plugin"):
        result = train(config, log_model=False)
    [recorder] = Recorder.instances
    return result, recorder, MlflowClient(tracking_uri)


def metric_steps(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_hook_register_data(hooked_run):
    result, recorder, client = hooked_run
    params = client.get_run(result.run_id).data.params
    assert params["data"] == "hooks-blobs" and params["data.n"] == "150"
    assert sum(int(params[f"data.n_{split}"]) for split in ("train", "val", "test")) == 150


def test_hook_register_models(hooked_run):
    assert FamilyPlugin.calls["model"] == [((4,), 3, 6)], "factory(input_shape, num_outputs, **options)"


def test_hook_register_optimizers(hooked_run):
    result, recorder, client = hooked_run
    [optimizer] = FamilyPlugin.calls["optimizer"]
    assert optimizer.param_groups[0]["initial_lr"] == 0.05


def test_hook_register_regularizers(hooked_run):
    result, recorder, client = hooked_run
    assert recorder.events, "the regularizer object built per run received lifecycle hooks"
    from optiflow.plugins import get_plugin_manager

    assert recorder not in get_plugin_manager().get_plugins(), "it is unregistered when the run ends"


def test_hook_register_schedulers(hooked_run):
    result, recorder, client = hooked_run
    real, rehearsed = FamilyPlugin.calls["scheduler"]
    assert real == rehearsed, "built again on a stand-in optimizer and stepped ahead before the run opens"
    length = real
    assert length.epochs == EPOCHS and length.steps_per_epoch > 1
    assert [lr for _, lr in metric_steps(client, result.run_id, "lr")] == pytest.approx([0.05, 0.025])


def test_hook_register_initializers(hooked_run):
    assert FamilyPlugin.calls["initializer"] == ["Linear", "Linear"]


def test_hook_check_run(hooked_run, tracking_uri):
    result, recorder, client = hooked_run
    params = client.get_run(result.run_id).data.params
    assert recorder.events[0] == ("check_run", None, int(params["data.n_train"])), "before the MLflow run opens"
    assert len(recorder.names("check_run")) == 1

    from optiflow.commands.train import train
    from optiflow.errors import OptiflowError
    from optiflow.plugins import get_plugin_manager

    class Refusing:
        def __init__(self, error: Exception) -> None:
            self.error = error

        @hookimpl
        def optiflow_check_run(self, run):
            raise self.error

    config = RunConfig.from_dict({"data": "hooks-blobs:n=60", "model": "hooks-net", "reg": ["hooks-recorder"],
                                  "epochs": 1, "tracking_uri": tracking_uri, "experiment": "test-hooks-refused"})
    cases = [(OptiflowError("hooks-net cannot take this"), OptiflowError, "^hooks-net cannot take this$"),
             (RuntimeError("boom"), PluginError, "plugin 'refusing' failed in optiflow_check_run: RuntimeError: boom")]
    for error, raised, message in cases:
        with registered_plugin(FamilyPlugin(), name="hooks-test-plugin"), \
                registered_plugin(Refusing(error), name="refusing"):
            with pytest.raises(raised, match=message):
                train(config, log_model=False)
    assert client.get_experiment_by_name("test-hooks-refused") is None, "a refused run logs nothing"
    assert not [p for p in get_plugin_manager().get_plugins() if isinstance(p, Recorder)], "the --reg objects left"


def test_hook_metric_names(hooked_run, tracking_uri):
    result, recorder, client = hooked_run
    logged = set(client.get_run(result.run_id).data.metrics)
    assert "val_hook_metric" in recorder.metric_names and {"train_loss", "val_loss", "lr"} <= recorder.metric_names
    assert recorder.metric_names <= logged, "every name the run said it would produce was logged"

    from optiflow.commands.train import train
    from optiflow.errors import OptiflowError

    def config(monitor: str, experiment: str) -> RunConfig:
        return RunConfig.from_dict({"data": "hooks-blobs:n=60", "model": "hooks-net", "epochs": 1,
                                    "reg": ["hooks-recorder", f"early-stopping:monitor={monitor}"],
                                    "tracking_uri": tracking_uri, "experiment": experiment})

    calls, instances = {k: list(v) for k, v in FamilyPlugin.calls.items()}, list(Recorder.instances)
    try:  # the other tests read what the hooked run recorded
        with registered_plugin(FamilyPlugin(), name="hooks-test-plugin"):
            assert train(config("val_hook_metric", "test-hooks-monitored"), log_model=False).epochs == 1
            with pytest.raises(OptiflowError, match=r"early-stopping monitors 'val_hook_metrc', which this run does "
                                                    r"not produce \(did you mean 'val_hook_metric'\?\)"):
                train(config("val_hook_metrc", "test-hooks-monitor-refused"), log_model=False)
    finally:
        FamilyPlugin.calls.clear()
        FamilyPlugin.calls.update(calls)
        Recorder.instances[:] = instances
    assert client.get_experiment_by_name("test-hooks-monitor-refused") is None, "a refused run logs nothing"


def test_hook_run_start(hooked_run):
    result, recorder, client = hooked_run
    assert recorder.events[1] == ("run_start", result.run_id, 0)
    assert len(recorder.names("run_start")) == 1


def test_hook_epoch_start(hooked_run):
    result, recorder, client = hooked_run
    assert recorder.names("epoch_start") == [("epoch_start", 1, True), ("epoch_start", 2, True)]


def test_hook_train_batch(hooked_run):
    result, recorder, client = hooked_run
    batches = recorder.names("train_batch")
    assert [e[1] for e in batches] == [e[1] for e in recorder.names("penalty")], "once per step, before the loss"
    assert {e[2:] for e in batches} == {("cpu", torch.int64)}
    received = FamilyPlugin.calls["train_batch"]
    assert len(received) == len(batches) and all(dtype.is_floating_point and len(shape) == 2
                                                  for dtype, shape in received), "chained: got the soft targets"
    assert all(0.0 <= a <= 1.0 for a in result.history["train_accuracy"])
    assert all(math.isfinite(loss) for loss in result.history["train_loss"]), "the loss takes soft targets"


def test_hook_penalty(hooked_run):
    result, recorder, client = hooked_run
    steps = [event[1] for event in recorder.names("penalty")]
    assert steps == list(range(1, len(steps) + 1)) and recorder.names("penalty")[0][2][1] == 3
    assert min(recorder.grads) > 0.9 * recorder.penalty_weight, "the penalty's gradient reaches the weights"


def test_hook_after_backward(hooked_run):
    result, recorder, client = hooked_run
    steps = [event[1] for event in recorder.names("after_backward")]
    assert steps == [event[1] for event in recorder.names("penalty")]
    assert recorder.last_weight_at_end.equal(recorder.last_weight_at_start), (
        "gradients zeroed in after_backward must keep the optimizer from moving those weights")


def test_hook_after_step(hooked_run):
    result, recorder, client = hooked_run
    assert [e[1] for e in recorder.names("after_step")] == [e[1] for e in recorder.names("after_backward")]
    assert all(recorder.changed_by_step), "after_step fires after optimizer.step() changed the weights"


def test_hook_validation_end(hooked_run):
    result, recorder, client = hooked_run
    assert recorder.names("validation_end") == [("validation_end", 1, True, 0.05), ("validation_end", 2, True, 0.025)]
    assert metric_steps(client, result.run_id, "val_hook_metric") == [(1, 10.0), (2, 20.0)]
    assert [e[2] for e in recorder.names("epoch_end")] == [10.0, 20.0], "it runs before epoch_end"


def test_hook_epoch_end(hooked_run):
    result, recorder, client = hooked_run
    assert metric_steps(client, result.run_id, "epoch_hook_metric") == [(1, 1.0), (2, 2.0)]
    assert [e[3] for e in recorder.names("epoch_end")] == [0.025, 0.0125], "after the epoch's scheduler step"
    assert result.epochs == STOP_AT and result.stop_reason == "the hook asked to stop"


def test_hook_run_end(hooked_run, tracking_uri, monkeypatch):
    result, recorder, client = hooked_run
    assert recorder.events[-1] == ("run_end", "FINISHED", STOP_AT)

    from optiflow.commands.train import train

    class Failing:
        @hookimpl
        def optiflow_epoch_end(self, run, epoch, metrics):
            raise RuntimeError("plugin failure")

    Recorder.instances.clear()
    config = RunConfig.from_dict({"data": "hooks-blobs:n=60", "model": "hooks-net", "reg": ["hooks-recorder"],
                                  "epochs": 2, "tracking_uri": tracking_uri, "experiment": "test-hooks-failed"})
    with registered_plugin(FamilyPlugin(), name="hooks-test-plugin"), registered_plugin(Failing()):
        with pytest.raises(PluginError, match="failed in optiflow_epoch_end: RuntimeError: plugin failure"):
            train(config, log_model=False)
    assert Recorder.instances[0].events[-1] == ("run_end", "FAILED", 1)


class BrokenArtifact:
    """The per-run object behind ``--reg broken-artifact``: its artifact hook fails after the test split is scored."""

    @hookimpl
    def optiflow_test_end(self, run, metrics, predictions):
        metrics["test_seen"] = 1.0
        raise ValueError("no matrix today")


class BrokenArtifactPlugin:
    @hookimpl
    def optiflow_register_regularizers(self, register):
        register("broken-artifact", BrokenArtifact)


def test_a_failing_test_end_names_the_plugin_and_fails_the_run_keeping_its_metrics_and_model(tracking_uri):
    """A ``--reg`` object's hook is blamed on the plugin that registered it; the run ends FAILED (so it is never
    reused without the hook's output) with the test metrics and the model logged: nothing trained is lost."""
    from mlflow.tracking import MlflowClient

    from optiflow.commands.train import train

    config = RunConfig.from_dict({"data": "hooks-blobs:n=60", "model": "hooks-net", "reg": ["broken-artifact"],
                                  "epochs": 1, "tracking_uri": tracking_uri, "experiment": "test-hooks-test-end-fails"})
    with registered_plugin(FamilyPlugin(), name="hooks-test-plugin"), \
            registered_plugin(BrokenArtifactPlugin(), name="artifact-plugin"):
        with pytest.raises(PluginError) as info:
            train(config)
    assert str(info.value).startswith("plugin 'artifact-plugin' failed in regularizer 'broken-artifact' "
                                      "(optiflow_test_end): ValueError: no matrix today")
    assert info.value.plugin == "artifact-plugin"
    client = MlflowClient(tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("test-hooks-test-end-fails").experiment_id])
    assert run.info.status == "FAILED" and "optiflow_test_end" in run.data.tags["failure"]
    assert {"test_loss", "test_accuracy", "test_seen"} <= set(run.data.metrics)
    assert client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run.info.run_id}'")


def test_hook_register_commands(invoke):
    import click

    class Commands:
        @hookimpl
        def optiflow_register_commands(self, cli):
            @cli.command()
            @click.option("--name", default="world")
            def hello(name):
                """Say hello from a plugin."""
                click.echo(f"hello {name}")

    with registered_plugin(Commands(), name="hello-plugin"):
        assert invoke("hello", "--name", "plugin").output == "hello plugin\n"
        assert "Say hello from a plugin." in invoke("--help").output
        rows = {row["name"]: row for row in json.loads(invoke("plugins", "--json").output)}
        assert rows["hello-plugin"]["commands"] == ["hello"] and not rows["hello-plugin"]["builtin"]
    assert invoke("hello").exit_code == 2, "the command leaves with its plugin"


def test_hook_test_end(tracking_uri):
    from mlflow.tracking import MlflowClient

    from optiflow.commands.train import train

    seen = []

    class Scored:
        @hookimpl
        def optiflow_test_end(self, run, metrics, predictions):
            seen.append((dict(metrics), predictions.shape, run.status))
            agree = (predictions.argmax(1) == run.splits.y_test).float().mean()
            metrics["test_agreement"] = float(agree)

    config = RunConfig.from_dict({"data": "hooks-blobs:n=150", "model": "hooks-net", "epochs": 1,
                                  "tracking_uri": tracking_uri, "experiment": "test-hooks-test-end"})
    with registered_plugin(FamilyPlugin(), name="hooks-test-plugin"), registered_plugin(Scored()):
        result = train(config, log_model=False)
    [(metrics, shape, status)] = seen
    assert set(metrics) == {"test_loss", "test_accuracy"} and status == "FINISHED"
    assert shape == (30, 3), "the model's outputs on the 30 test samples, one row each"
    logged = MlflowClient(tracking_uri).get_run(result.run_id).data.metrics
    assert logged["test_agreement"] == pytest.approx(metrics["test_accuracy"]), "predictions are what was scored"


def test_hook_epoch_metric_names(tracking_uri):
    """What a plugin declares it adds at epoch end is among the run's final metrics before it opens, and logged;
    a plugin outside optiflow adding metrics without declaring them is noticed."""
    from optiflow.plugins import adds_undeclared_metrics, get_plugin_manager
    from optiflow.training import preflight, produced_metric_names, train

    class Declaring:
        @hookimpl
        def optiflow_epoch_metric_names(self, run):
            return ["declared_metric"]

        @hookimpl
        def optiflow_epoch_end(self, run, epoch, metrics):
            metrics["declared_metric"] = float(epoch)

    config = RunConfig.from_dict({"epochs": 1, "tracking_uri": tracking_uri, "experiment": "test-hooks-epoch-names"})
    with registered_plugin(Declaring(), name="declaring"):
        run = preflight(config)
        assert {"declared_metric", "train_seconds", "test_loss"} <= produced_metric_names(run)
        assert run.metrics_declared and not adds_undeclared_metrics(get_plugin_manager())
        result = train(config, log_model=False)
    assert "declared_metric" in result.history
    undeclared = type("Undeclared", (), {"optiflow_epoch_end": hookimpl(lambda self, run, epoch, metrics: None)})
    with registered_plugin(undeclared(), name="undeclared"):
        assert adds_undeclared_metrics(get_plugin_manager())
