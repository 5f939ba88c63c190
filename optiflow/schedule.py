"""What scheduler plugins return: the scheduler and when the core steps it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from optiflow.errors import OptiflowError


@dataclass(frozen=True)
class TrainingLength:
    """How long training lasts, for schedulers that need to know (cosine, onecycle ...)."""

    epochs: int
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @classmethod
    def of(cls, epochs: int, n_train: int, batch_size: int | str, drop_last: bool = False) -> TrainingLength:
        """The length of training on ``n_train`` samples in batches as the runner makes them."""
        size = n_train if batch_size == "full" else int(batch_size)
        steps = max(1, n_train // size) if drop_last else math.ceil(n_train / size)
        return cls(epochs, steps)


@dataclass
class Schedule:
    """A learning-rate scheduler and when the core steps it."""

    scheduler: Any = None
    interval: str = "epoch"
    monitor: str | None = None

    def step(self, metrics: dict[str, float] | None = None) -> None:
        if self.scheduler is None:
            return
        if self.monitor is None:
            self.scheduler.step()
            return
        value = (metrics or {}).get(self.monitor)
        if value is None:
            raise OptiflowError(f"scheduler monitors '{self.monitor}', which this run does not produce")
        self.scheduler.step(value)
