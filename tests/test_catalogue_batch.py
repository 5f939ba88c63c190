"""Batch-level techniques and data-aware initialization: mixup, cutmix, their composition with
label smoothing, the loss reported for optimizers that re-evaluate it (SAM), and LSUV."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from optiflow import distributed
from optiflow.config import RunConfig
from optiflow.errors import OptiflowError
from optiflow.loop import training_step
from optiflow.plugins import get_plugin_manager, get_registry
from optiflow.run import prepare


def build(kind: str, name: str, *context, **options):
    return get_registry().get(kind, name).build(*context, **options)


def batch_run(classes: int = 3, seed: int = 0):
    """The parts of a Run a batch transform touches."""
    return SimpleNamespace(config=SimpleNamespace(seed=seed), source=SimpleNamespace(num_classes=classes),
                           task="classification")


def test_mixup_with_alpha_near_zero_equals_no_mixup():
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    outputs = torch.randn(64, 3)
    mixup = build("regularizer", "mixup", alpha=1e-4)
    for _ in range(5):
        mixed_x, soft_y = mixup.optiflow_train_batch(batch_run(), x, y)
        torch.testing.assert_close(mixed_x, x, atol=1e-5, rtol=0)
        torch.testing.assert_close(nn.functional.cross_entropy(outputs, soft_y),
                                   nn.functional.cross_entropy(outputs, y), atol=1e-5, rtol=0)


def test_mixup_mixes_inputs_and_labels_with_the_same_weight():
    x = torch.arange(16, dtype=torch.float32).unsqueeze(1)          # sample i is the value i, of class i
    y = torch.arange(16)
    for seed in range(3):
        mixed_x, soft_y = build("regularizer", "mixup", alpha=1.0).optiflow_train_batch(batch_run(16, seed), x, y)
        torch.testing.assert_close(soft_y.sum(1), torch.ones(16))
        torch.testing.assert_close(mixed_x.squeeze(1), soft_y @ torch.arange(16.0))
        assert (soft_y.max(1).values >= 0.5 - 1e-6).all(), "the kept sample has the larger weight"
        assert (soft_y.max(1).values < 1).any(), "alpha=1 mixes"


def test_cutmix_mixes_labels_by_pasted_area():
    images = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 2, 16, 16).contiguous()
    y = torch.arange(8)                                              # image i is all i, of class i
    cutmix = build("regularizer", "cutmix", alpha=1.0)
    mixed_some = False
    for _ in range(10):
        result = cutmix.optiflow_train_batch(batch_run(8), images, y)
        if result is None:
            continue
        mixed, soft_y = result
        torch.testing.assert_close(mixed.mean((1, 2, 3)), soft_y @ torch.arange(8.0))
        mixed_some = mixed_some or bool((soft_y.max(1).values < 1).any())
    assert mixed_some
    assert torch.equal(images[:, 0, 0, 0], torch.arange(8, dtype=torch.float32)), "the input batch is intact"


def test_soft_targets_compose_with_label_smoothing():
    outputs, soft = torch.randn(10, 4), torch.softmax(torch.randn(10, 4), 1)
    loss = nn.CrossEntropyLoss(label_smoothing=0.2)(outputs, soft)
    expected = -(((1 - 0.2) * soft + 0.2 / 4) * outputs.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("name", ["mixup", "cutmix"])
def test_mixing_refuses_bad_options(name):
    with pytest.raises(OptiflowError, match="alpha must be > 0"):
        build("regularizer", name, alpha=0.0)
    with pytest.raises(OptiflowError, match="probability"):
        build("regularizer", name, probability=1.5)


def test_mixing_state_resumes_the_same_draws():
    x, y = torch.randn(8, 3), torch.arange(8) % 3
    first = build("regularizer", "mixup", alpha=1.0)
    first.optiflow_train_batch(batch_run(), x, y)
    resumed = build("regularizer", "mixup", alpha=1.0)
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(first.optiflow_train_batch(batch_run(), x, y), resumed.optiflow_train_batch(batch_run(seed=9), x, y)):
        assert torch.equal(a, b)


def test_mixing_with_probability_zero_leaves_batches_alone():
    x, y = torch.randn(8, 3), torch.arange(8) % 3
    assert build("regularizer", "mixup", probability=0.0).optiflow_train_batch(batch_run(), x, y) is None


class LookTwice(torch.optim.Optimizer):
    """A SAM-like optimizer: evaluates the loss at the weights, then at perturbed weights, and
    steps with the second gradient (here: a plain SGD step)."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    def step(self, closure):
        first = closure()
        params = [p for group in self.param_groups for p in group["params"]]
        with torch.no_grad():
            for p in params:
                p.add_(1.0)
        closure()
        with torch.no_grad():
            for p in params:
                p.sub_(1.0)
                p.sub_(self.param_groups[0]["lr"] * p.grad)
        return first


def test_a_sam_like_optimizer_reports_the_loss_at_the_current_weights(tmp_path):
    config = RunConfig.from_dict({"epochs": 1, "batch_size": 32, "device": "cpu", "data": "iris",
                                  "data_dir": str(tmp_path), "model": "mlp:hidden=[8]"})
    run = prepare(config, get_registry())
    run.optimizer = LookTwice(run.model.parameters())
    x, y = run.splits.x_train[:32], run.splits.y_train[:32]
    with torch.no_grad():
        at_weights = float(run.loss_fn(run.model(x), y))
    objective, loss, outputs, *_ = training_step(run, get_plugin_manager(), distributed.current())(x, y)
    assert float(loss) == pytest.approx(at_weights, rel=1e-5) and objective is loss, "no penalty: one loss"
    assert outputs.shape == (32, 3) and outputs.requires_grad is False


def layer_output_variances(model: nn.Module, x: torch.Tensor) -> list[float]:
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    variances: list[float] = []
    handles = [layer.register_forward_hook(lambda m, i, o: variances.append(float(o.var()))) for layer in layers]
    model.eval()
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return variances


def test_lsuv_gives_unit_output_variance_per_layer_on_a_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))
    x = 5.0 * torch.randn(512, 10) + 2.0
    assert not all(abs(v - 1) < 0.05 for v in layer_output_variances(model, x)), "PyTorch's init is not LSUV"
    build("initializer", "lsuv", batch=512, tol=0.05)(model, x)
    variances = layer_output_variances(model, x)
    assert len(variances) == 3 and all(abs(v - 1) < 0.05 for v in variances), variances


def test_lsuv_initializes_a_conv_model_through_prepare(tmp_path):
    config = RunConfig.from_dict({"epochs": 1, "device": "cpu", "data": "digits", "data_dir": str(tmp_path),
                                  "model": "cnn", "init": "lsuv:batch=300,tol=0.02"})
    run = prepare(config, get_registry())
    variances = layer_output_variances(run.model, run.splits.x_train[:1000])
    assert len(variances) >= 3 and all(abs(v - 1) < 0.1 for v in variances), variances


def test_lsuv_refuses_bad_options():
    with pytest.raises(OptiflowError, match="batch must be >= 2"):
        build("initializer", "lsuv", batch=1)
