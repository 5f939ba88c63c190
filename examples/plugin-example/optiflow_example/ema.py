"""An exponential moving average (EMA) of the weights, kept beside the trained model.

The averaged weights usually generalize better than the last ones (Polyak averaging).
They are validated every epoch and logged as ``ema_val_loss``/``ema_val_accuracy``, which
a monitoring scheduler or early stopping can watch; with ``apply_at_end`` they replace the
model's weights when training finishes, so the test metrics and the logged model use them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from optiflow import hookimpl
from optiflow.loop import evaluate
from optiflow.metrics import evaluation_metric_names


class WeightEMA:
    """shadow = d * shadow + (1 - d) * weights after every optimizer step, d = min(decay, (1 + k) / (10 + k))."""

    def __init__(self, *, decay: float = 0.99, apply_at_end: bool = False) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay, self.apply_at_end = decay, apply_at_end
        self.updates = 0
        self.live: list[torch.Tensor] = []
        self.shadow: list[torch.Tensor] = []

    @hookimpl
    def optiflow_run_start(self, run):
        self.live = list(run.model.state_dict().values())
        self.shadow = [tensor.detach().clone() for tensor in self.live]

    @hookimpl
    def optiflow_after_step(self, run, step):
        self.update()

    @hookimpl
    def optiflow_metric_names(self, run):
        """Declared, so that a scheduler or early stopping may monitor them (``--reg early-stopping:monitor=ema_val_loss``)."""
        return evaluation_metric_names(run.task, "ema_val") if len(run.splits.x_val) else []

    @hookimpl
    def optiflow_validation_end(self, run, epoch, metrics):
        if len(run.splits.x_val):
            with self.swapped_in():
                metrics.update(evaluate(run, run.splits.x_val, run.splits.y_val, "ema_val"))

    @hookimpl
    def optiflow_run_end(self, run, status):
        if self.apply_at_end and status == "FINISHED":
            self.copy(self.shadow, self.live)
            run.set_tags({"ema.applied": "true"})

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, live in zip(self.shadow, self.live):
            if shadow.is_floating_point():
                shadow.lerp_(live, 1.0 - decay)
            else:
                shadow.copy_(live)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own again after it."""
        saved = [tensor.clone() for tensor in self.live]
        self.copy(self.shadow, self.live)
        try:
            yield
        finally:
            self.copy(saved, self.live)

    @staticmethod
    @torch.no_grad()
    def copy(source: list[torch.Tensor], target: list[torch.Tensor]) -> None:
        for src, dst in zip(source, target):
            dst.copy_(src)
