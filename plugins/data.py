"""Datasets, normalizers and augmentations."""

from __future__ import annotations

from optiflow import hookimpl
from optiflow.data import DataContext, DataSource


@hookimpl
def optiflow_register_data(register):
    register("digits", digits)
    register("none", NoNormalization, kind="normalizer")
    register("standard", Standardize, kind="normalizer")


def digits(ctx: DataContext, *, image: bool = False) -> DataSource:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)."""
    import torch
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    if image:
        x = x.reshape(-1, 1, 8, 8)
    y = torch.tensor(bunch.target, dtype=torch.long)
    return DataSource(x, y, "classification", num_classes=10, classes=[str(c) for c in bunch.target_names])


class NoNormalization:
    """Leave features as they are."""

    def fit(self, x):
        return self

    def transform(self, x):
        return x

    def state(self):
        return {}


class Standardize:
    """Zero mean, unit variance per feature (per channel for images), fitted on the training split."""

    def __init__(self, *, eps: float = 1e-8) -> None:
        self.eps = eps
        self.mean = self.std = None

    def fit(self, x):
        dims = [0] if x.ndim == 2 else [0, *range(2, x.ndim)]
        self.mean = x.mean(dim=dims, keepdim=True)
        std = x.std(dim=dims, keepdim=True)
        self.std = std.masked_fill(std < self.eps, 1.0)  # constant features stay as they are
        return self

    def transform(self, x):
        return (x - self.mean) / self.std

    def state(self):
        return {"mean": self.mean.flatten(), "std": self.std.flatten()}
