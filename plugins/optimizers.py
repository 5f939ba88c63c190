"""Optimizers from torch.optim."""

from __future__ import annotations

from optiflow import hookimpl
from optiflow.optim import decay_params


@hookimpl
def optiflow_register_optimizers(register):
    register("sgd", sgd)
    register("adam", adam)


def sgd(model, *, lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
        decay_bias: bool = False):
    """Stochastic gradient descent (with optional momentum / Nesterov)."""
    import torch

    return torch.optim.SGD(decay_params(model, decay_bias), lr=lr, momentum=momentum, nesterov=nesterov,
                           weight_decay=weight_decay)


def adam(model, *, lr: float = 1e-3, betas: tuple[float, ...] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: float = 0.0, decay_bias: bool = False):
    """Adam: adaptive moment estimation."""
    import torch

    return torch.optim.Adam(decay_params(model, decay_bias), lr=lr, betas=tuple(betas), eps=eps,
                            weight_decay=weight_decay)
