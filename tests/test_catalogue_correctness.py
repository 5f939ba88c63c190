"""The built-in techniques do what their textbooks say, not merely run."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from optiflow.commands.train import train
from optiflow.config import RunConfig
from optiflow.data import split
from optiflow.errors import OptiflowError
from optiflow.metrics import epoch_metric_names
from optiflow.plugins import get_registry
from optiflow.run import prepare
from optiflow.schedule import TrainingLength

from helpers import assert_no_run


def build(kind: str, name: str, *context, **options):
    return get_registry().get(kind, name).build(*context, **options)


def small_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))


def config(tmp_path, **values) -> RunConfig:
    base = {"epochs": 2, "batch_size": 64, "device": "cpu", "data_dir": str(tmp_path)}
    return RunConfig.from_dict({**base, **values})


def fake_run(model, **fields):
    """The parts of a Run that regularizer hooks touch."""
    tags: dict = {}
    run = SimpleNamespace(model=model, stop_reason=None, tags=tags, **fields)
    run.request_stop = lambda reason: setattr(run, "stop_reason", run.stop_reason or reason)
    run.set_tags = tags.update
    return run


# --- penalties and weight decay -------------------------------------------------------------------


@pytest.mark.parametrize("name, formula", [("l1", lambda w: w.abs().sum()), ("l2", lambda w: w.pow(2).sum())])
def test_penalty_equals_its_formula_on_weights_only(name, formula):
    model = small_mlp()
    penalty = build("regularizer", name, strength=0.3)
    with torch.no_grad():
        expected = 0.3 * (formula(model[0].weight) + formula(model[3].weight))
    assert float(penalty.optiflow_penalty(run=fake_run(model)).detach()) == pytest.approx(float(expected), rel=1e-6)
    with torch.no_grad():
        model[0].bias.fill_(100.0)
        model[1].weight.fill_(100.0)
        model[3].bias.fill_(-7.0)
    assert float(penalty.optiflow_penalty(run=fake_run(model)).detach()) == pytest.approx(float(expected), rel=1e-6)
    metrics: dict = {}
    penalty.optiflow_epoch_end(run=fake_run(model), epoch=1, metrics=metrics)
    assert metrics[f"penalty_{name}"] == pytest.approx(float(expected), rel=1e-6)


def decay_one_step(optimizer) -> None:
    """A step with all-zero gradients: only weight decay moves parameters."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_weight_decay_leaves_biases_and_norm_parameters_alone_by_default(opt):
    model = small_mlp()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    decay_one_step(build("optimizer", opt, model, lr=0.1, weight_decay=0.5))
    after = dict(model.named_parameters())
    for name in ("0.bias", "1.weight", "1.bias", "3.bias"):
        assert torch.equal(after[name], before[name]), name
    for name in ("0.weight", "3.weight"):
        assert torch.allclose(after[name], before[name] * (1 - 0.1 * 0.5)), name

    model = small_mlp()
    decay_one_step(build("optimizer", opt, model, lr=0.1, weight_decay=0.5, decay_bias=True))
    assert torch.allclose(model[0].bias, before["0.bias"] * 0.95)


def test_a_run_with_the_weight_decay_regularizer_keeps_weights_and_biases_in_separate_groups(tmp_path):
    with_decay = prepare(config(tmp_path, reg=["weight-decay"], opt="sgd"), get_registry())
    without = prepare(config(tmp_path, opt="sgd"), get_registry())
    assert len(with_decay.optimizer.param_groups) == 2
    assert len(without.optimizer.param_groups) == 1


def test_weight_decay_regularizer_sets_decay_on_weight_groups_only():
    from optiflow.optim import keep_decay_groups

    model = small_mlp()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with keep_decay_groups():  # as the core builds the optimizer of a run with this regularizer
        optimizer = build("optimizer", "sgd", model, lr=0.1)
    regularizer = build("regularizer", "weight-decay", strength=0.5)
    run = fake_run(model, optimizer=optimizer, plan=SimpleNamespace(opt=(SimpleNamespace(name="sgd"), {})))
    regularizer.optiflow_run_start(run=run)
    decay_one_step(optimizer)
    assert torch.allclose(model[0].weight, before["0.weight"] * 0.95)
    assert torch.equal(model[0].bias, before["0.bias"])
    metrics: dict = {}
    regularizer.optiflow_epoch_end(run=run, epoch=1, metrics=metrics)
    expected = math.sqrt(float(model[0].weight.detach().pow(2).sum() + model[3].weight.detach().pow(2).sum()))
    assert metrics["weight_norm"] == pytest.approx(expected, rel=1e-5)


def test_weight_decay_regularizer_refuses_optimizers_without_decay():
    model = small_mlp()
    run = fake_run(model, optimizer=build("optimizer", "lbfgs", model),
                   plan=SimpleNamespace(opt=(SimpleNamespace(name="lbfgs"), {})))
    with pytest.raises(OptiflowError, match="has no weight decay"):
        build("regularizer", "weight-decay").optiflow_check_run(run=run)


# --- optimizers -----------------------------------------------------------------------------------


def test_lbfgs_lowers_a_convex_loss_to_the_noise_floor(tmp_path):
    cfg = config(tmp_path, data="linear:noise=0.1", model="linear", opt="lbfgs", batch_size="full", norm="none")
    run = prepare(cfg, get_registry())
    x, y = run.splits.x_train, run.splits.y_train

    def closure():
        run.optimizer.zero_grad()
        loss = run.loss_fn(run.model(x), y)
        loss.backward()
        return loss

    initial = float(closure().detach())
    run.optimizer.step(closure)
    final = float(closure().detach())
    assert initial > 1.0
    assert final == pytest.approx(0.1**2, rel=0.3)  # the noise variance: nothing left to fit
    assert run.model[1].weight.item() == pytest.approx(3.0, abs=0.05)
    assert run.model[1].bias.item() == pytest.approx(2.0, abs=0.05)


def test_sparse_adam_trains_sparse_embeddings():
    torch.manual_seed(0)
    model = nn.Embedding(10, 3, sparse=True)
    optimizer = build("optimizer", "sparse-adam", model, lr=0.1)
    before = model.weight.detach().clone()
    model(torch.tensor([1, 2])).sum().backward()
    optimizer.step()
    changed = (model.weight != before).any(dim=1)
    assert changed.tolist() == [i in (1, 2) for i in range(10)]


def test_sparse_adam_on_dense_model_is_one_clear_line(invoke):
    result = invoke("train", "--opt", "sparse-adam", "--epochs", "1")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "Error: sparse-adam needs sparse gradients (nn.Embedding(sparse=True)); this model's gradients are dense: use adam"
    ]


# --- schedulers -----------------------------------------------------------------------------------


def optimizer_with_lr(lr: float = 1.0):
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def test_plateau_monitors_validation_loss_and_cuts_after_patience():
    optimizer = optimizer_with_lr(1.0)
    schedule = build("scheduler", "plateau", optimizer, TrainingLength(20, 5), patience=2, factor=0.5)
    assert (schedule.monitor, schedule.interval) == ("val_loss", "epoch")
    lrs = []
    for value in [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]:
        optimizer.step()
        schedule.step({"val_loss": value})
        lrs.append(optimizer.param_groups[0]["lr"])
    # epoch 1 sets the best; epochs 2-3 are the `patience` bad epochs; the third bad epoch cuts the rate
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]


def test_step_halves_at_the_right_epochs(tmp_path, tracking_uri, experiment):
    cfg = config(tmp_path, data="iris", sched="step:step_size=3,gamma=0.5", opt="sgd:lr=0.08", epochs=7,
                 tracking_uri=tracking_uri, experiment=experiment)
    result = train(cfg, log_model=False)
    assert result.history["lr"] == pytest.approx([0.08, 0.08, 0.08, 0.04, 0.04, 0.04, 0.02])


@pytest.mark.parametrize("name", get_registry().names("scheduler"))
def test_warmup_ramps_linearly_then_hands_over(name):
    """With warmup_epochs=2 the rate climbs 1/3, 2/3, 1 of where the scheduler starts, then the scheduler runs."""
    length = TrainingLength(epochs=6, steps_per_epoch=4)
    plain_opt = optimizer_with_lr(0.1)
    plain = build("scheduler", name, plain_opt, TrainingLength(4, 4))
    warm_opt = optimizer_with_lr(0.1)
    warm = build("scheduler", name, warm_opt, length, warmup_epochs=2)
    assert warm.interval == plain.interval
    per = 4 if warm.interval == "step" else 1
    start = plain_opt.param_groups[0]["lr"]
    metrics = {warm.monitor: 1.0} if warm.monitor else None
    seen = [warm_opt.param_groups[0]["lr"]]
    for _ in range(2 * per):
        warm_opt.step()
        warm.step(metrics)
        seen.append(warm_opt.param_groups[0]["lr"])
    ramp = [start * (i + 1) / (2 * per + 1) for i in range(2 * per)] + [start]
    assert seen == pytest.approx(ramp)
    for _ in range(3 * per):
        warm_opt.step()
        plain_opt.step()
        warm.step(metrics)
        plain.step(metrics)
        assert warm_opt.param_groups[0]["lr"] == pytest.approx(plain_opt.param_groups[0]["lr"])


# --- initializers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options, expected_std",
    [
        ("xavier-uniform", {}, math.sqrt(2 / (400 + 300))),
        ("xavier-normal", {"gain": 2.0}, 2 * math.sqrt(2 / (400 + 300))),
        ("kaiming-uniform", {}, math.sqrt(2) / math.sqrt(400)),
        ("kaiming-normal", {}, math.sqrt(2) / math.sqrt(400)),
        ("kaiming-normal", {"mode": "fan_out"}, math.sqrt(2) / math.sqrt(300)),
        ("kaiming-normal", {"nonlinearity": "tanh"}, (5 / 3) / math.sqrt(400)),
        ("normal", {"std": 0.2}, 0.2),
    ],
)
def test_initializer_gives_the_documented_std(name, options, expected_std):
    torch.manual_seed(0)
    layer = nn.Linear(400, 300)
    build("initializer", name, bias=0.25, **options)(layer)
    assert float(layer.weight.detach().std()) == pytest.approx(expected_std, rel=0.02)
    assert float(layer.weight.detach().mean()) == pytest.approx(0.0, abs=expected_std * 0.02)
    assert torch.all(layer.bias == 0.25)


def test_orthogonal_and_sparse_initializers():
    layer = nn.Linear(50, 30)
    build("initializer", "orthogonal")(layer)
    assert torch.allclose(layer.weight @ layer.weight.T, torch.eye(30), atol=1e-5)
    conv = nn.Conv2d(3, 20, 3)
    build("initializer", "sparse", sparsity=0.5)(conv)
    zeros_per_column = (conv.weight.reshape(20, -1) == 0).sum(dim=0)
    assert torch.all(zeros_per_column == 10)


@pytest.mark.parametrize("name", ["zeros", "constant"])
def test_identical_weight_initializers_warn_about_symmetry(name):
    with pytest.warns(UserWarning, match="symmetry is never broken"):
        initializer = build("initializer", name)
    layer = nn.Linear(4, 3)
    initializer(layer)
    assert len(set(layer.weight.flatten().tolist())) == 1


# --- data -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", get_registry().names("normalizer"))
def test_normalizer_is_fitted_on_the_training_split_only(name, tmp_path, monkeypatch):
    data = "digits:image=true" if name == "per-channel" else "digits"
    cfg = config(tmp_path, data=data, norm=name)
    registry = get_registry()
    component = registry.get("normalizer", name)
    fitted_on = []

    def recording_factory(**options):
        normalizer = component.factory(**options)
        fit = normalizer.fit
        normalizer.fit = lambda x: fitted_on.append(x.clone()) or fit(x)
        return normalizer

    monkeypatch.setitem(registry.components["normalizer"], name, _replace_factory(component, recording_factory))
    run = prepare(cfg, registry)
    raw = split(registry.get("dataset", "digits").build(None, **({"image": True} if "image" in data else {})),
                cfg.val_split, cfg.test_split, cfg.seed)
    assert len(fitted_on) == 1 and torch.equal(fitted_on[0], raw.x_train)
    assert torch.allclose(run.splits.x_test, run.normalizer.transform(raw.x_test))


def _replace_factory(component, factory):
    import dataclasses

    return dataclasses.replace(component, factory=factory)


def test_normalizers_reach_their_targets_on_the_training_split():
    torch.manual_seed(0)
    x = torch.randn(300, 6) @ torch.randn(6, 6) + 3.0
    standard = build("normalizer", "standard").fit(x).transform(x)
    assert torch.allclose(standard.mean(0), torch.zeros(6), atol=1e-4)
    assert torch.allclose(standard.std(0), torch.ones(6), atol=1e-4)
    low, high = build("normalizer", "scale").fit(x).transform(x).aminmax(dim=0)
    assert torch.allclose(low, -torch.ones(6)) and torch.allclose(high, torch.ones(6))
    low, high = build("normalizer", "minmax").fit(x).transform(x).aminmax(dim=0)
    assert torch.allclose(low, torch.zeros(6)) and torch.allclose(high, torch.ones(6))
    pca = build("normalizer", "pca", n_components=3).fit(x)
    projected = pca.transform(x)
    assert projected.shape == (300, 3)
    variances = projected.var(0)
    assert torch.all(variances[:-1] >= variances[1:])
    white = build("normalizer", "whiten").fit(x).transform(x)
    assert torch.allclose(torch.cov(white.T), torch.eye(6), atol=1e-3)
    images = torch.rand(50, 3, 4, 4) * torch.tensor([1.0, 5.0, 9.0]).reshape(1, 3, 1, 1)
    per_channel = build("normalizer", "per-channel").fit(images).transform(images)
    assert torch.allclose(per_channel.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    state = build("normalizer", "per-channel", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]).fit(images).state()
    assert state["mean"].tolist() == [0.5, 0.5, 0.5]


def test_pca_keeps_the_requested_share_of_variance():
    torch.manual_seed(0)
    x = torch.randn(500, 4) * torch.tensor([10.0, 3.0, 0.5, 0.1])
    pca = build("normalizer", "pca", n_components=0.95).fit(x)
    assert pca.state()["n_components"] == 2
    assert pca.state()["explained_variance_ratio"] >= 0.95


def test_flip_is_drawn_per_sample():
    torch.manual_seed(0)
    image = torch.arange(16.0).reshape(1, 4, 4)
    transform = build("augmentation", "hflip", p=0.5)
    outcomes = {torch.equal(transform(image), image.flip(-1)) for _ in range(40)}
    assert outcomes == {True, False}


# --- regularizers that act during training --------------------------------------------------------


def test_early_stopping_stops_after_patience_and_restores_the_best_weights():
    model = nn.Linear(2, 1)
    stopper = build("regularizer", "early-stopping", patience=3, min_delta=0.01)
    run = fake_run(model, splits=SimpleNamespace(x_val=torch.zeros(5)), metric_names=frozenset({"val_loss"}))
    stopper.optiflow_check_run(run=run)
    for epoch, val_loss in enumerate([1.0, 0.5, 0.495, 0.6, 0.7], start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        metrics = {"val_loss": val_loss}
        stopper.optiflow_epoch_end(run=run, epoch=epoch, metrics=metrics)
        if epoch < 5:
            assert run.stop_reason is None, epoch
    assert "did not improve for 3 epochs" in run.stop_reason
    stopper.optiflow_run_end(run=run, status="FINISHED")
    assert torch.all(model.weight == 2.0)
    assert run.tags["early_stopping.restored_epoch"] == 2


def test_early_stopping_ends_a_real_run(tmp_path, tracking_uri, experiment, mlflow_client):
    cfg = config(tmp_path, data="iris", epochs=10, reg=["early-stopping:patience=2,min_delta=100"],
                 tracking_uri=tracking_uri, experiment=experiment)
    result = train(cfg, log_model=False)
    assert result.epochs == 3 and "early stopping" in result.stop_reason
    run = mlflow_client.get_run(result.run_id)
    assert run.data.tags["early_stopping.restored_epoch"] == "1"
    assert run.data.tags["stopped_epoch"] == "3"


def test_bad_regularizer_option_fails_before_any_run_exists(invoke, mlflow_client, experiment):
    result = invoke("train", "--reg", "l2:strength=-1", "--epochs", "1")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["Error: regularizer 'l2': strength must be >= 0.0, got -1.0"]
    assert_no_run(mlflow_client, experiment)


def test_early_stopping_needs_a_validation_split():
    stopper = build("regularizer", "early-stopping")
    with pytest.raises(OptiflowError, match="no validation set"):
        stopper.optiflow_check_run(run=fake_run(nn.Linear(1, 1), splits=SimpleNamespace(x_val=torch.zeros(0)),
                                                metric_names=frozenset(epoch_metric_names("classification", False))))


def test_gradient_noise_follows_the_annealing_schedule():
    noise = build("regularizer", "gradient-noise", eta=0.5, gamma=0.55)
    model = nn.Linear(500, 400, bias=False)
    measured = {}
    torch.manual_seed(0)
    for step in (1, 100, 10_000):
        model.weight.grad = torch.zeros_like(model.weight)
        noise.optiflow_after_backward(run=fake_run(model), step=step)
        measured[step] = float(model.weight.grad.std())
        assert measured[step] == pytest.approx(math.sqrt(0.5 / (1 + step) ** 0.55), rel=0.02)
    assert measured[1] > measured[100] > measured[10_000]


def test_grad_clip_bounds_the_norm_and_counts_clipped_steps():
    model = nn.Linear(10, 1)
    clip = build("regularizer", "grad-clip", threshold=1.0)
    for scale in (10.0, 0.01, 5.0):
        model.weight.grad = torch.full_like(model.weight, scale)
        model.bias.grad = torch.full_like(model.bias, scale)
        clip.optiflow_after_backward(run=fake_run(model), step=1)
        total = torch.cat([model.weight.grad.flatten(), model.bias.grad]).norm()
        assert float(total) <= 1.0 + 1e-5
    metrics: dict = {}
    clip.optiflow_epoch_end(run=fake_run(model), epoch=1, metrics=metrics)
    assert metrics["grad_clip_count"] == 2
    assert metrics["grad_clip_norm_max"] == pytest.approx(10.0 * math.sqrt(11), rel=1e-5)

    by_value = build("regularizer", "grad-clip", mode="value", threshold=0.5)
    model.weight.grad = torch.linspace(-3, 3, 10).reshape(1, 10)
    by_value.optiflow_after_backward(run=fake_run(model), step=1)
    assert float(model.weight.grad.abs().max()) == 0.5


def test_label_smoothing_changes_the_live_loss():
    loss = nn.CrossEntropyLoss()
    run = fake_run(nn.Linear(2, 2), task="classification", loss_fn=loss)
    build("regularizer", "label-smoothing", epsilon=0.2).optiflow_run_start(run=run)
    logits, target = torch.tensor([[10.0, -10.0]]), torch.tensor([0])
    assert float(loss(logits, target)) == pytest.approx(0.1 * 20, rel=1e-3)  # epsilon/2 of the mass on class 1
    with pytest.raises(OptiflowError, match="classification"):
        build("regularizer", "label-smoothing").optiflow_check_run(
            run=fake_run(nn.Linear(1, 1), task="regression", loss_fn=nn.MSELoss()))


def test_dropout_regularizer_drops_hidden_units_in_training_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 200), nn.ReLU(), nn.Linear(200, 1))
    run = fake_run(model)
    dropout = build("regularizer", "dropout", p=0.5)
    dropout.optiflow_run_start(run=run)
    seen = []
    model[2].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
    x = torch.ones(1, 4)
    model.eval()
    model(x)
    model.train()
    model(x)
    hidden = model[1](model[0](x))
    assert torch.equal(seen[0], hidden)
    dropped = (seen[1] == 0) & (hidden != 0)
    assert 0.3 < float(dropped.sum()) / float((hidden != 0).sum()) < 0.7
    assert run.tags["dropout.layers"] == 1
    dropout.optiflow_run_end(run=run, status="FINISHED")
    assert not model[0]._forward_pre_hooks and len(model[2]._forward_pre_hooks) == 1


# --- models and diagnostics -----------------------------------------------------------------------


def test_maxout_is_a_real_layer():
    layer = build("activation", "maxout", pieces=3)
    x = torch.tensor([[1.0, 5.0, 2.0, -1.0, -3.0, -2.0]])
    assert layer(x).tolist() == [[5.0, -1.0]]
    model = build("model", "mlp", (10,), 2, hidden=(8,), activation="maxout")
    assert model[1].out_features == 16 and model(torch.zeros(4, 10)).shape == (4, 2)


def test_model_activations_take_their_own_options():
    model = build("model", "mlp", (1,), 1, hidden=(4,), activation="leaky-relu:negative_slope=0.1")
    assert isinstance(model[2], nn.LeakyReLU) and model[2].negative_slope == 0.1
    cnn = build("model", "cnn", (1, 8, 8), 2, activation="elu:alpha=0.5")
    assert {m.alpha for m in cnn.modules() if isinstance(m, nn.ELU)} == {0.5}
    with pytest.raises(OptiflowError, match="no option 'slope'"):
        build("model", "mlp", (1,), 1, hidden=(4,), activation="leaky-relu:slope=0.1")


def test_mlp_batch_norm_before_or_after_the_activation():
    before = build("model", "mlp", (10,), 2, hidden=(8,), batch_norm="before", activation="tanh")
    after = build("model", "mlp", (10,), 2, hidden=(8,), batch_norm="after", activation="tanh")
    assert [type(m).__name__ for m in before][1:4] == ["Linear", "BatchNorm1d", "Tanh"]
    assert [type(m).__name__ for m in after][1:4] == ["Linear", "Tanh", "BatchNorm1d"]


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_cnn_adapts_to_input_size_and_channels(shape):
    model = build("model", "cnn", shape, 10)
    assert model(torch.zeros(2, *shape)).shape == (2, 10)
    assert model[0].in_channels == shape[0]


def test_image_models_refuse_flat_inputs_clearly():
    with pytest.raises(OptiflowError, match="needs images"):
        build("model", "cnn", (64,), 10)
    with pytest.raises(OptiflowError, match="at least 12x12"):
        build("model", "lenet", (1, 8, 8), 10)


def test_gradient_norms_are_logged_per_layer_and_show_vanishing_gradients(tmp_path, tracking_uri, experiment,
                                                                           mlflow_client):
    cfg = config(tmp_path, data="iris", model="mlp:hidden=[16,16,16,16,16,16],activation=sigmoid", epochs=2,
                 opt="sgd", tracking_uri=tracking_uri, experiment=experiment)
    result = train(cfg, log_model=False)
    logged = {key for key in mlflow_client.get_run(result.run_id).data.metrics if key.startswith("grad_norm/")}
    assert logged == {f"grad_norm/fc{index}" for index in range(1, 8)}, "named after the layers, not their positions"
    first, last = result.history["grad_norm/fc1"], result.history["grad_norm/fc7"]
    assert len(first) == len(last) == 2
    assert first[-1] < last[-1] / 10  # deep sigmoid nets starve their first layers
    artifacts = {a.path for a in mlflow_client.list_artifacts(result.run_id)}
    assert "gradient_flow.png" in artifacts
    assert len(mlflow_client.get_metric_history(result.run_id, "grad_norm/fc1")) == 2


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
        self.head = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
        self.fc1 = nn.Linear(2, 2)


@pytest.mark.parametrize("model, layers", [
    (("mlp", (4,), 3, {"hidden": (8, 8), "batch_norm": "before"}), ["fc1", "bn1", "fc2", "bn2", "fc3"]),
    (("cnn", (1, 8, 8), 3, {}), ["conv1", "bn1", "conv2", "bn2", "fc1", "fc2", "fc3"]),
    (("lenet", (1, 12, 12), 3, {}), ["conv1", "conv2", "fc1", "fc2", "fc3"]),
    (TwoBranches, ["features.conv1", "features.conv2", "head.fc1", "head.fc2", "fc1"]),
])
def test_gradient_norms_are_named_after_the_layers_and_checkpoints_keep_their_keys(model, layers):
    from optiflow_plugins.diagnostics import GradientFlow

    if isinstance(model, tuple):
        name, shape, outputs, options = model
        model = build("model", name, shape, outputs, **options)
    else:
        model = model()
    keys = list(model.state_dict())
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    assert list(GradientFlow().measure(model)) == layers
    assert list(model.state_dict()) == keys


def test_identity_activation_makes_an_mlp_a_linear_map():
    """What the forgotten-activations example relies on: without a nonlinearity the layers compose linearly."""
    model = get_registry().get("model", "mlp").build((4,), 3, hidden=(8, 5), activation="identity")
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    bias = model(torch.zeros(1, 4))
    assert torch.allclose(model(a + b) - bias, (model(a) - bias) + (model(b) - bias), atol=1e-5)


# --- losses ------------------------------------------------------------------------------------------


def test_mse_on_classification_is_the_quadratic_cost_of_softmax_against_one_hot():
    loss = get_registry().get("loss", "mse").factory("classification")
    logits, targets = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]), torch.tensor([0, 1])
    p = logits.softmax(1)
    one_hot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert float(loss(logits, targets)) == pytest.approx(float(((p - one_hot) ** 2).mean()), rel=1e-6)
    regression = get_registry().get("loss", "mse").factory("regression")
    assert float(regression(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0]))) == pytest.approx(2.5)


def test_quadratic_cost_trains_a_classifier(tmp_path, tracking_uri, experiment):
    cfg = config(tmp_path, data="iris", loss="mse", opt="adam:lr=0.05", epochs=30, tracking_uri=tracking_uri,
                 experiment=experiment)
    result = train(cfg, log_model=False)
    assert result.metrics["test_accuracy"] > 0.85


def test_early_stopping_never_takes_a_non_finite_value_as_best():
    stopper = get_registry().get("regularizer", "early-stopping").build(patience=2)
    stopped: list[str] = []
    run = SimpleNamespace(model=nn.Linear(1, 1), request_stop=stopped.append)
    for epoch, value in enumerate([math.nan, math.inf, math.nan], 1):
        stopper.optiflow_epoch_end(run=run, epoch=epoch, metrics={"val_loss": value})
    assert stopper.best is None
    assert stopped and "no finite val_loss yet" in stopped[0] and "nan" not in stopped[0]
    stopper.optiflow_epoch_end(run=run, epoch=4, metrics={"val_loss": 0.5})
    assert stopper.best == 0.5 and stopper.best_epoch == 4
