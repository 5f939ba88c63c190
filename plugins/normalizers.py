"""Normalizers: feature scaling fitted on the training split only, then applied to every split.

Each fitted normalizer is a torch module (``module()``, built in ``optiflow_plugins.normalizer_layers``)
that normalizes the training data and becomes part of the logged model.
"""

from __future__ import annotations

from optiflow import hookimpl
from optiflow.errors import OptiflowError


@hookimpl
def optiflow_register_data(register):
    for name, factory in NORMALIZERS.items():
        register(name, factory, kind="normalizer")


class NoNormalization:
    """Leave features as they are."""

    def fit(self, x):
        return self

    def transform(self, x):
        return x

    def module(self):
        from torch import nn

        return nn.Identity()

    def state(self):
        return {}


class Standardize:
    """Zero mean, unit variance per feature (per pixel for images), fitted on the training split."""

    def __init__(self, *, eps: float = 1e-8) -> None:
        self.eps = eps
        self.mean = self.std = None

    def reduce_dims(self, x) -> list[int]:
        return [0]

    def fit(self, x):
        dims = self.reduce_dims(x)
        self.mean = x.mean(dim=dims, keepdim=True)
        std = x.std(dim=dims, keepdim=True) if len(x) > 1 else x.new_ones(self.mean.shape)
        self.std = std.masked_fill(std < self.eps, 1.0)
        return self

    def transform(self, x):
        return self.module()(x)

    def module(self):
        from optiflow_plugins.normalizer_layers import Standardization

        return Standardization(self.mean, self.std)

    def state(self):
        return {"mean": self.mean.flatten(), "std": self.std.flatten()}


class PerChannel(Standardize):
    """Per-channel mean/std for images (N, C, H, W), fitted on the training split unless mean and std are given."""

    def __init__(self, *, mean: tuple[float, ...] = (), std: tuple[float, ...] = (), eps: float = 1e-8) -> None:
        super().__init__(eps=eps)
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise OptiflowError("per-channel: give mean and std together, one positive std per channel")
        self.fixed = (mean, std) if mean else None

    def reduce_dims(self, x) -> list[int]:
        if x.ndim != 4:
            raise OptiflowError(
                f"per-channel normalization needs images (N, C, H, W), got shape {list(x.shape)}; use standard"
            )
        return [0, 2, 3]

    def fit(self, x):
        if self.fixed is None:
            return super().fit(x)
        self.reduce_dims(x)
        mean, std = (x.new_tensor(values).reshape(1, -1, 1, 1) for values in self.fixed)
        if mean.shape[1] != x.shape[1]:
            raise OptiflowError(f"per-channel: {mean.shape[1]} mean values for images with {x.shape[1]} channels")
        self.mean, self.std = mean, std
        return self


class MinMax:
    """Rescale each feature linearly to [low, high] using the training split's min and max."""

    def __init__(self, low: float = 0.0, high: float = 1.0) -> None:
        self.low, self.high = low, high
        self.min = self.range = None

    def fit(self, x):
        self.min = x.amin(dim=0, keepdim=True)
        span = x.amax(dim=0, keepdim=True) - self.min
        self.range = span.masked_fill(span <= 0, 1.0)
        return self

    def transform(self, x):
        return self.module()(x)

    def module(self):
        from optiflow_plugins.normalizer_layers import Rescaling

        return Rescaling(self.min, self.range, self.low, self.high)

    def state(self):
        return {"min": self.min.flatten(), "max": (self.min + self.range).flatten(), "low": self.low, "high": self.high}


def minmax():
    """Rescale each feature to [0, 1] with the training split's min and max."""
    return MinMax(0.0, 1.0)


def scale():
    """Rescale each feature to [-1, 1] with the training split's min and max."""
    return MinMax(-1.0, 1.0)


class PCA:
    """Project flattened inputs on the training split's top principal components (optionally whitened)."""

    def __init__(self, n_components: float | None, whiten: bool, eps: float) -> None:
        if n_components is not None and (n_components <= 0 or (n_components >= 1 and not n_components.is_integer())):
            raise OptiflowError(
                f"n_components must be a whole number of components or a variance fraction in (0, 1), got {n_components}"
            )
        self.n_components, self.whiten, self.eps = n_components, whiten, eps
        self.mean = self.components = self.variance = None
        self.ratio = 0.0

    def fit(self, x):
        import torch

        flat = x.flatten(1).double()
        self.mean = flat.mean(dim=0)
        centered = flat - self.mean
        covariance = centered.T @ centered / max(1, len(flat) - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
        total = eigenvalues.sum().clamp_min(1e-300)
        k = self._count(eigenvalues, total)
        self.components = eigenvectors[:, :k].T.contiguous()
        self.variance = eigenvalues[:k]
        self.ratio = float(self.variance.sum() / total)
        return self

    def _count(self, eigenvalues, total) -> int:
        useful = int((eigenvalues > eigenvalues[0] * 1e-10).sum()) or 1
        if self.n_components is None:
            return useful
        if self.n_components < 1:
            cumulative = eigenvalues.cumsum(0) / total
            return min(useful, int((cumulative < self.n_components).sum()) + 1)
        return min(int(self.n_components), len(eigenvalues))

    def transform(self, x):
        return self.module()(x)

    def module(self):
        from optiflow_plugins.normalizer_layers import Projection

        scale = (self.variance + self.eps).sqrt() if self.whiten else None
        return Projection(self.mean, self.components, scale)

    def state(self):
        return {"n_components": len(self.components), "explained_variance_ratio": self.ratio, "whiten": self.whiten,
                "mean": self.mean, "components": self.components, "explained_variance": self.variance}


def pca(*, n_components: float | None = 0.95):
    """PCA on flattened inputs: keep n_components components (or, below 1, that fraction of the variance)."""
    return PCA(n_components, whiten=False, eps=0.0)


def whiten(*, n_components: float | None = None, eps: float = 1e-5):
    """PCA whitening: decorrelated components scaled to unit variance (all non-degenerate ones by default)."""
    return PCA(n_components, whiten=True, eps=eps)


NORMALIZERS = {
    "none": NoNormalization,
    "minmax": minmax,
    "scale": scale,
    "standard": Standardize,
    "per-channel": PerChannel,
    "pca": pca,
    "whiten": whiten,
}
