"""The fitted transforms of the built-in normalizers as torch modules, their statistics as buffers.

Training normalizes through these same modules, so the logged model (which contains one) sees
its inputs exactly as training did.  Imported lazily: this module imports torch.
"""

from __future__ import annotations

import torch
from torch import nn


class Standardization(nn.Module):
    """``(x - mean) / std`` with broadcastable ``mean`` and ``std`` (per feature, pixel or channel)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Rescaling(nn.Module):
    """Maps ``[minimum, minimum + span]`` linearly onto ``[low, high]``, per feature."""

    def __init__(self, minimum: torch.Tensor, span: torch.Tensor, low: float, high: float) -> None:
        super().__init__()
        self.register_buffer("minimum", minimum)
        self.register_buffer("span", span)
        self.low, self.high = low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.low + (x - self.minimum) / self.span * (self.high - self.low)

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}"


class Projection(nn.Module):
    """Flattened inputs centred and projected on principal components (in float64), divided by
    ``scale`` when whitening; returns float32."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, scale: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("components", components)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = (x.flatten(1).double() - self.mean) @ self.components.T
        if self.scale is not None:
            projected = projected / self.scale
        return projected.float()
