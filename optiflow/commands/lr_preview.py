"""``optiflow lr-preview``: step the configured optimizer and schedule through training, without a model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from optiflow.config import RunConfig
from optiflow.errors import OptiflowError
from optiflow.schedule import TrainingLength, follow, rehearse

MAX_STEPS = 10_000_000  # the preview steps a real optimizer through each one


@dataclass
class SchedulePreview:
    """The learning rate at every optimizer step (positions in epochs) and where warmup ends."""

    positions: list[float]
    rates: list[float]
    length: TrainingLength
    monitor: str | None
    warmup_end: float | None

    def per_epoch(self, rows: int = 12) -> list[tuple[int, float, float, float]]:
        """``(epoch, lr at its start, lowest, highest)`` for at most ``rows`` evenly spaced epochs (and the last)."""
        steps = self.length.steps_per_epoch
        epochs = self.length.epochs
        stride = max(1, -(-epochs // rows))
        shown = sorted({*range(1, epochs + 1, stride), epochs})
        table = []
        for epoch in shown:
            rates = self.rates[(epoch - 1) * steps : epoch * steps]
            table.append((epoch, rates[0], min(rates), max(rates)))
        return table


def preview(config: RunConfig, steps_per_epoch: int | None = None) -> SchedulePreview:
    """The schedule ``config`` would follow; the data is loaded only to count batches (unless given).

    Schedules that watch a metric (plateau) see one that never improves.
    """
    import torch

    from optiflow.data import DataContext, split
    from optiflow.plan import plan
    from optiflow.plugins import get_plugin_manager, get_registry
    from optiflow.run import build, build_optimizer, build_schedule, stepped_parts
    from optiflow.training import training_error

    if steps_per_epoch is not None and steps_per_epoch < 1:
        raise OptiflowError(f"--steps-per-epoch must be >= 1, got {steps_per_epoch}")
    resolved = plan(config, get_registry())
    if steps_per_epoch is None:
        dataset, options = resolved.data
        source = build(dataset, DataContext(Path(config.data_dir), config.seed), **options)
        n_train = len(split(source, config.val_split, config.test_split, config.seed,
                            cv_folds=config.cv_folds, cv_fold=config.cv_fold).x_train)
        length = TrainingLength.of(config.epochs, n_train, config.batch_size, config.drop_last)
    else:
        length = TrainingLength(config.epochs, steps_per_epoch)
    if length.epochs * length.steps_per_epoch > MAX_STEPS:
        raise OptiflowError(f"lr-preview steps through every optimizer step: {length.epochs} epochs x "
                            f"{length.steps_per_epoch} steps is more than {MAX_STEPS}")
    optimizer, schedule = build_optimizer(resolved, torch.nn.Linear(1, 1), length)
    rehearse(optimizer, length, lambda stand_in: build_schedule(resolved, stand_in, length), resolved.sched[0].name,
             steps=None)
    try:
        steps = list(follow(optimizer, schedule, length))
    except Exception as exc:
        raise training_error(get_plugin_manager(), exc, "lr-preview", stepped_parts(resolved, optimizer, schedule)) from exc
    positions, rates = [position for position, _ in steps], [lr for _, lr in steps]
    return SchedulePreview(positions, rates, length, schedule.monitor, _warmup_end(positions, rates))


def _warmup_end(positions: list[float], rates: list[float]) -> float | None:
    """Where the learning rate first reaches its peak, when it rises to it from the start
    (step by step, or epoch by epoch for schedules stepped per epoch)."""
    end = 0
    while end + 1 < len(rates) and rates[end + 1] >= rates[end]:
        end += 1
    peak = rates.index(max(rates[: end + 1])) if rates else 0
    return positions[peak] if rates and rates[peak] > rates[0] else None
