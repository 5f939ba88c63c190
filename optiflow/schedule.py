"""What scheduler plugins return (the scheduler and when the core steps it), and the warm-up every scheduler gets."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from optiflow.errors import OptiflowError, first_line
from optiflow.registry import WARMUP_OPTION

if TYPE_CHECKING:
    from torch.optim import Optimizer


def samples_per_batch(batch_size: int | str, n_train: int) -> int:
    """What ``--batch-size`` means in samples: ``full`` is the whole training split."""
    return n_train if batch_size == "full" else int(batch_size)


@dataclass(frozen=True)
class TrainingLength:
    """How long training lasts, for schedulers that need to know (cosine, onecycle ...)."""

    epochs: int
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        """Optimizer steps in the whole training."""
        return self.epochs * self.steps_per_epoch

    @classmethod
    def of(cls, epochs: int, n_train: int, batch_size: int | str, drop_last: bool = False) -> TrainingLength:
        """The length of training on ``n_train`` samples in batches as the runner makes them."""
        size = samples_per_batch(batch_size, n_train)
        steps = max(1, n_train // size) if drop_last else math.ceil(n_train / size)
        return cls(epochs, steps)


class Scheduler(Protocol):
    """What the core steps: a PyTorch LR scheduler (``ReduceLROnPlateau`` takes the monitored value)."""

    def step(self, *args: float) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Schedule:
    """A learning-rate scheduler and when the core steps it."""

    scheduler: Scheduler | None = None
    interval: str = "epoch"
    monitor: str | None = None

    def step(self, metrics: dict[str, float] | None = None) -> None:
        """Step the scheduler; one that monitors a metric gets ``metrics[monitor]``."""
        if self.scheduler is None:
            return
        if self.monitor is None:
            self.scheduler.step()
            return
        value = (metrics or {}).get(self.monitor)
        if value is None:
            raise OptiflowError(f"scheduler monitors '{self.monitor}', which this run does not produce")
        self.scheduler.step(value)


def follow(optimizer: Optimizer, schedule: Schedule, length: TrainingLength,
           monitored: float = 1.0) -> Iterator[tuple[float, float]]:
    """``(position in epochs, learning rate)`` at every optimizer step of training, stepping ``optimizer``
    (with :func:`stand_in_closure`) and ``schedule`` as the training loop does; a monitored metric stays at
    ``monitored`` (it never improves): what ``lr-preview`` draws."""
    closure = stand_in_closure(optimizer)
    for epoch in range(length.epochs):
        for step in range(length.steps_per_epoch):
            yield epoch + step / length.steps_per_epoch, float(optimizer.param_groups[0]["lr"])
            optimizer.step(closure)
            if schedule.interval == "step":
                schedule.step()
        if schedule.interval == "epoch":
            schedule.step({schedule.monitor: monitored} if schedule.monitor else None)


def stand_in_closure(optimizer: Optimizer) -> Callable[[], Any]:
    """The closure ``lr-preview`` steps ``optimizer`` with, on its stand-in parameters, keeping training's step
    contract: it zeroes the gradients, computes a loss (half the parameters' squared norm) with its gradients,
    and returns it as a tensor; no hook runs."""
    import torch

    params = [p for group in optimizer.param_groups for p in group["params"]]

    def closure() -> Any:  # a tensor, where torch's stubs say float
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = sum((0.5 * p.float().pow(2).sum() for p in params), torch.zeros(()))
            loss.backward()
        return loss

    return closure


#: how many steps of a schedule :func:`rehearse` takes before a run opens (under a millisecond each)
REHEARSED_STEPS = 200


def rehearse(optimizer: Optimizer, length: TrainingLength, build_schedule: Callable[[Optimizer], Schedule], name: str,
             steps: int | None = REHEARSED_STEPS) -> None:
    """Build the schedule on a stand-in of ``optimizer`` (its hyper-parameters, one-number parameters) and step it
    ``steps`` times (None: through the whole training), so that options that fail in a later step (a division by
    zero) or give a negative or non-finite learning rate are refused in one line before a run opens, the real
    optimizer untouched."""
    import copy
    import warnings

    import torch

    params = [p for group in optimizer.param_groups for p in group["params"]]
    stand_in = copy.deepcopy(optimizer, {id(p): torch.zeros(1, requires_grad=True) for p in params})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a scheduler stepped before its optimizer
            schedule = build_schedule(stand_in)
            per_step = schedule.interval == "step"
            total = length.total_steps if per_step else length.epochs
            metrics = {schedule.monitor: 1.0} if schedule.monitor and not per_step else None
            for step in range(min(total, steps if steps is not None else total) + 1):
                lr = float(stand_in.param_groups[0]["lr"])
                if not (math.isfinite(lr) and lr >= 0):
                    where = f"step {step + 1}" if per_step else f"epoch {step + 1}"
                    raise OptiflowError(f"scheduler '{name}' gives a learning rate of {lr:g} at {where}; "
                                        "check its options")
                if step < total:
                    schedule.step(metrics)
    except OptiflowError:
        raise
    except (ArithmeticError, ValueError, RuntimeError, IndexError, TypeError) as exc:
        raise OptiflowError(f"scheduler '{name}' cannot step with these options: "
                            f"{type(exc).__name__}: {first_line(exc)}") from None


def scheduled(factory: Callable[..., Any], call: Callable[..., Any], optimizer: Optimizer, length: TrainingLength,
              options: dict[str, Any]) -> Schedule:
    """The schedule a scheduler plugin's ``factory`` makes (``call(optimizer, length, **options)`` calls it), with
    the warm-up applied by the core when the factory does not declare ``warmup_epochs`` itself."""
    if WARMUP_OPTION in inspect.signature(factory).parameters:
        return as_schedule(call(optimizer, length, **options))
    rest = dict(options)
    warmup_epochs = int(rest.pop(WARMUP_OPTION, 0))
    return warm_up(optimizer, length, warmup_epochs, lambda left: as_schedule(call(optimizer, left, **rest)))


def with_warmup(optimizer: Optimizer, length: TrainingLength, warmup_epochs: int, interval: str,
                build: Callable[[TrainingLength], Any] | None, monitor: str | None = None) -> Schedule:
    """For scheduler plugins: the scheduler ``build`` makes for the training left after warm-up, with a linear
    warm-up over ``warmup_epochs`` chained before it, all stepped at ``interval`` (``"epoch"`` or ``"step"``)."""
    return warm_up(optimizer, length, warmup_epochs,
                   lambda rest: Schedule(build(rest) if build is not None else None, interval, monitor))


def warm_up(optimizer: Optimizer, length: TrainingLength, warmup_epochs: int,
            build_schedule: Callable[[TrainingLength], Schedule]) -> Schedule:
    """The one warm-up: the ``Schedule`` that ``build_schedule`` makes for the training left after
    ``warmup_epochs`` epochs, preceded by a linear warm-up to its starting rate, stepped at its interval."""
    if warmup_epochs < 0 or (warmup_epochs and warmup_epochs >= length.epochs):
        raise OptiflowError(f"warmup_epochs must be between 0 and epochs - 1 ({length.epochs - 1}), got {warmup_epochs}")
    schedule = build_schedule(TrainingLength(length.epochs - warmup_epochs, length.steps_per_epoch))
    if not warmup_epochs:
        return schedule
    iterations = warmup_epochs * (length.steps_per_epoch if schedule.interval == "step" else 1)
    return Schedule(LinearWarmup(optimizer, iterations, schedule.scheduler), schedule.interval, schedule.monitor)


def as_schedule(made: object) -> Schedule:
    """What a scheduler factory returned as a :class:`Schedule` (a bare scheduler is stepped per epoch)."""
    return made if isinstance(made, Schedule) else Schedule(cast("Scheduler | None", made))


class LinearWarmup:
    """Raise the learning rate linearly to where ``then`` starts over ``iterations`` steps, then step ``then``.

    The wrapped scheduler is untouched during warm-up, so it starts from its
    own first learning rate as if warm-up had not happened.
    """

    def __init__(self, optimizer: Optimizer, iterations: int, then: Scheduler | None = None) -> None:
        self.optimizer, self.iterations, self.then = optimizer, iterations, then
        self.targets = [group["lr"] for group in optimizer.param_groups]
        self.count = 0
        self._apply()

    def step(self, *args: float) -> None:
        self.count += 1
        if self.count <= self.iterations:
            self._apply()
        elif self.then is not None:
            self.then.step(*args)

    def _apply(self) -> None:
        fraction = min(1.0, (self.count + 1) / (self.iterations + 1))
        for group, target in zip(self.optimizer.param_groups, self.targets):
            group["lr"] = target * fraction

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "targets": self.targets,
                "then": self.then.state_dict() if self.then is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.targets = state["count"], state["targets"]
        if self.then is not None and state.get("then") is not None:
            self.then.load_state_dict(state["then"])
