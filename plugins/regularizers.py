"""Regularizers: objects registered as plugins for one run, acting through lifecycle hooks."""

from __future__ import annotations

from optiflow import hookimpl


@hookimpl
def optiflow_register_regularizers(register):
    register("l2", L2Penalty)


def weights(model):
    """The parameters penalties apply to: weight matrices and kernels, not biases or norm scales."""
    from torch import nn

    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    for module in model.modules():
        if isinstance(module, norm_types):
            continue
        for name, param in module.named_parameters(recurse=False):
            if name == "weight" and param.ndim > 1:
                yield param


class L2Penalty:
    """Adds strength * sum(w^2) over weights (not biases) to the loss."""

    def __init__(self, *, strength: float = 1e-4) -> None:
        if strength < 0:
            raise ValueError(f"strength must be >= 0, got {strength}")
        self.strength = strength

    def value(self, model):
        return self.strength * sum(p.pow(2).sum() for p in weights(model))

    @hookimpl
    def optiflow_penalty(self, run):
        return self.value(run.model)

    @hookimpl
    def optiflow_epoch_end(self, run, epoch, metrics):
        import torch

        with torch.no_grad():
            metrics["penalty_l2"] = float(self.value(run.model))
