"""Weight initializers, applied to every Linear and Conv layer."""

from __future__ import annotations

from optiflow import hookimpl


@hookimpl
def optiflow_register_initializers(register):
    register("default", default)
    register("xavier-uniform", xavier_uniform)


def default():
    """Keep PyTorch's own initialization of each layer."""
    return None


def xavier_uniform(*, gain: float = 1.0, bias: float = 0.0):
    """Glorot/Xavier uniform: U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out))."""
    from torch import nn

    def apply(layer):
        nn.init.xavier_uniform_(layer.weight, gain=gain)
        if layer.bias is not None:
            nn.init.constant_(layer.bias, bias)

    return apply
