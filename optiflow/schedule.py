"""What scheduler plugins return: the scheduler and when the core steps it."""

from __future__ import annotations

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
