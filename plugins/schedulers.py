"""Learning-rate schedulers."""

from __future__ import annotations

from optiflow import hookimpl
from optiflow.schedule import Schedule


@hookimpl
def optiflow_register_schedulers(register):
    register("none", constant)
    register("step", step)


def constant(optimizer, length):
    """Keep the learning rate constant."""
    return Schedule(None)


def step(optimizer, length, *, step_size: int = 10, gamma: float = 0.1):
    """Multiply the learning rate by gamma every step_size epochs."""
    import torch

    return Schedule(torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma), "epoch")
