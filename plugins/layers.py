"""Layers the built-in plugins build models from (imported lazily: this module imports torch)."""

from __future__ import annotations

import torch
from torch import nn


class Maxout(nn.Module):
    """Max over groups of ``pieces`` consecutive features (dim 1), dividing their number by ``pieces``."""

    def __init__(self, pieces: int) -> None:
        super().__init__()
        self.pieces = pieces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (x.shape[1] // self.pieces, self.pieces)).amax(dim=2)

    def extra_repr(self) -> str:
        return f"pieces={self.pieces}"


class SoftmaxMSE(nn.Module):
    """The quadratic cost for classification: mean squared error between the softmax of the
    outputs (logits) and the one-hot targets (or soft targets: class probabilities), averaged
    over samples and classes."""

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probabilities = outputs.softmax(1)
        if targets.ndim == 1:
            targets = nn.functional.one_hot(targets, probabilities.shape[1])
        return nn.functional.mse_loss(probabilities, targets.to(probabilities.dtype))


class MSE(nn.MSELoss):
    """Mean squared error with outputs reshaped to the targets' shape ((N, 1) against (N,)): the plain loss
    of regression (``optiflow.run.is_task_loss``), so a run trained on it logs it once as train_loss."""

    task_loss = "regression"

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super().forward(outputs.reshape(targets.shape), targets)
