"""The hook implementations optiflow finds through this distribution's ``optiflow`` entry point.

Factories import torch (and the modules that need it) only when called, so
registering costs nothing.
"""

from __future__ import annotations

from typing import Annotated

from optiflow import hookimpl
from optiflow.data import DataContext, DataSource
from optiflow.optim import decay_params
from optiflow.registry import Nested


@hookimpl
def optiflow_register_optimizers(register):
    register("lion", lion)
    # the built-in 'adam' stays as it is; this one is --opt example/adam, a deliberate reuse: no clash warning
    register("adam", adam, namespaced_only=True)


@hookimpl
def optiflow_register_data(register):
    register("spirals", spirals)
    register("two-moons", two_moons, aliases=["moons"])
    register("noisy-labels", noisy_labels)


@hookimpl
def optiflow_register_regularizers(register):
    register("ema", ema)
    register("confusion-matrix", confusion_matrix)


def lion(model, *, lr: float = 1e-4, betas: tuple[float, ...] = (0.9, 0.99), weight_decay: float = 0.0,
         decay_bias: bool = False):
    """Lion: sign of interpolated momentum with decoupled weight decay (Chen et al., 2023)."""
    from optiflow_example.lion import Lion

    return Lion(decay_params(model, decay_bias), lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def adam(model, *, lr: float = 1e-3, weight_decay: float = 0.01):
    """AdamW whose weight decay spares biases and normalization parameters (example/adam)."""
    import torch

    return torch.optim.AdamW(decay_params(model, weight_decay=weight_decay), lr=lr, weight_decay=weight_decay)


def spirals(ctx: DataContext, *, n: int = 600, arms: int = 2, turns: float = 1.5, noise: float = 0.05) -> DataSource:
    """Interleaved 2-D spirals, one class per arm: not linearly separable."""
    from optiflow_example.datasets import make_spirals

    x, y = make_spirals(n, arms=arms, turns=turns, noise=noise, seed=ctx.seed)
    return DataSource(x, y, "classification", num_classes=arms, classes=[f"arm {k}" for k in range(arms)])


def two_moons(ctx: DataContext, *, n: int = 600, noise: float = 0.1) -> DataSource:
    """scikit-learn's two interleaving half circles in 2-D."""
    import torch
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=n, noise=noise, random_state=ctx.seed)
    return DataSource(torch.tensor(x, dtype=torch.float32), torch.tensor(y), "classification", num_classes=2)


def ema(*, decay: float = 0.99, apply_at_end: bool = False):
    """Exponential moving average of the weights, validated each epoch as ema_val_* metrics."""
    from optiflow_example.ema import WeightEMA

    return WeightEMA(decay=decay, apply_at_end=apply_at_end)


def noisy_labels(ctx: DataContext, *, base: Annotated[Nested, "dataset"] = "two-moons", flip: float = 0.1) -> DataSource:
    """Any registered classification dataset (an option that is a component) with a fraction flip of its labels
    changed at random: --data noisy-labels:base=[spirals:n=400],flip=0.2."""
    import torch

    if not 0.0 <= flip <= 1.0:
        raise ValueError(f"flip must be in [0, 1], got {flip}")
    source = base.build(ctx)
    if source.task != "classification":
        raise ValueError(f"noisy-labels needs a classification dataset, '{base.name}' is {source.task}")
    generator = torch.Generator().manual_seed(ctx.seed)
    flipped = torch.rand(len(source.y), generator=generator) < flip
    shift = torch.randint(1, source.num_classes, (len(source.y),), generator=generator)
    source.y = torch.where(flipped, (source.y + shift) % source.num_classes, source.y)
    return source


def confusion_matrix():
    """The test split's confusion matrix as confusion_matrix.json, on runs that log artifacts."""
    from optiflow_example.confusion import ConfusionMatrix

    return ConfusionMatrix()
