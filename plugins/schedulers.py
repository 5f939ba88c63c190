"""Learning-rate schedulers from torch.optim.lr_scheduler, each with an explicit stepping interval.

Every scheduler takes ``warmup_epochs``: the learning rate first rises
linearly to the scheduler's starting rate over that many epochs (stepped at
the scheduler's own interval), then the scheduler takes over for the rest of
training.  The core gives the same option to plugin schedulers that do not
declare it (:func:`optiflow.schedule.with_warmup`).
"""

from __future__ import annotations

from typing import Literal

from optiflow import hookimpl
from optiflow.errors import OptiflowError
from optiflow.metrics import higher_is_better
from optiflow.schedule import with_warmup as _schedule


@hookimpl
def optiflow_register_schedulers(register):
    for name, factory in SCHEDULERS.items():
        register(name, factory)


def constant(optimizer, length, *, warmup_epochs: int = 0):
    """Keep the learning rate constant (after an optional warm-up); per epoch."""
    return _schedule(optimizer, length, warmup_epochs, "epoch", None)


def step(optimizer, length, *, step_size: int = 10, gamma: float = 0.1, warmup_epochs: int = 0):
    """Multiply the learning rate by gamma every step_size epochs; per epoch."""
    from torch.optim import lr_scheduler

    _positive(step_size=step_size)
    _rates(gamma=gamma)
    return _schedule(optimizer, length, warmup_epochs, "epoch",
                     lambda rest: lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma))


def multistep(optimizer, length, *, milestones: tuple[int, ...] = (30, 60, 90), gamma: float = 0.1,
              warmup_epochs: int = 0):
    """Multiply the learning rate by gamma at each milestone epoch (counted after warm-up); per epoch."""
    from torch.optim import lr_scheduler

    _rates(gamma=gamma)
    return _schedule(optimizer, length, warmup_epochs, "epoch",
                     lambda rest: lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma))


def exponential(optimizer, length, *, gamma: float = 0.95, warmup_epochs: int = 0):
    """Multiply the learning rate by gamma every epoch; per epoch."""
    from torch.optim import lr_scheduler

    _rates(gamma=gamma)
    return _schedule(optimizer, length, warmup_epochs, "epoch", lambda rest: lr_scheduler.ExponentialLR(optimizer, gamma))


def plateau(optimizer, length, *, monitor: str = "val_loss", mode: Literal["auto", "min", "max"] = "auto",
            factor: float = 0.1, patience: int = 10, threshold: float = 1e-4, min_lr: float = 0.0,
            warmup_epochs: int = 0):
    """Multiply the learning rate by factor when the monitored metric stops improving for patience epochs; per epoch."""
    from torch.optim import lr_scheduler

    _rates(factor=factor, min_lr=min_lr, minimum=0.0)
    if mode == "auto":
        mode = "max" if higher_is_better(monitor) else "min"
    return _schedule(optimizer, length, warmup_epochs, "epoch", lambda rest: lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=mode, factor=factor, patience=patience, threshold=threshold, min_lr=min_lr), monitor)


def cosine(optimizer, length, *, min_lr: float = 0.0, warmup_epochs: int = 0):
    """Cosine annealing from the initial rate to min_lr over the remaining epochs; per epoch."""
    from torch.optim import lr_scheduler

    _rates(min_lr=min_lr, minimum=0.0)
    return _schedule(optimizer, length, warmup_epochs, "epoch",
                     lambda rest: lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, rest.epochs), eta_min=min_lr))


def cosine_restarts(optimizer, length, *, first_cycle: int = 10, cycle_mult: int = 1, min_lr: float = 0.0,
                    warmup_epochs: int = 0):
    """SGDR: cosine annealing restarted every first_cycle epochs, cycles growing by cycle_mult; per epoch."""
    from torch.optim import lr_scheduler

    _positive(first_cycle=first_cycle, cycle_mult=cycle_mult)
    _rates(min_lr=min_lr, minimum=0.0)
    return _schedule(optimizer, length, warmup_epochs, "epoch", lambda rest: lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=first_cycle, T_mult=cycle_mult, eta_min=min_lr))


def onecycle(optimizer, length, *, max_lr: float | None = None, pct_start: float = 0.3,
             anneal: Literal["cos", "linear"] = "cos", div_factor: float = 25.0, final_div_factor: float = 1e4,
             warmup_epochs: int = 0):
    """One-cycle policy (Smith 2018): up to max_lr (default: the optimizer's lr), then down; per batch."""
    from torch.optim import lr_scheduler

    _rates(div_factor=div_factor, final_div_factor=final_div_factor, **({} if max_lr is None else {"max_lr": max_lr}))
    peak = max_lr if max_lr is not None else [group["lr"] for group in optimizer.param_groups]
    return _schedule(optimizer, length, warmup_epochs, "step", lambda rest: lr_scheduler.OneCycleLR(
        optimizer, max_lr=peak, total_steps=max(2, rest.total_steps), pct_start=pct_start, anneal_strategy=anneal,
        div_factor=div_factor, final_div_factor=final_div_factor, cycle_momentum=_has_momentum(optimizer)))


def cyclic(optimizer, length, *, base_lr: float | None = None, max_lr: float | None = None,
           step_size_up: int = 2000, mode: Literal["triangular", "triangular2", "exp_range"] = "triangular",
           gamma: float = 1.0, warmup_epochs: int = 0):
    """Cyclical learning rates (Smith 2017) between base_lr (default lr/10) and max_lr (default lr); per batch."""
    from torch.optim import lr_scheduler

    _positive(step_size_up=step_size_up)
    _rates(gamma=gamma, **{name: value for name, value in (("base_lr", base_lr), ("max_lr", max_lr)) if value is not None})
    lr = optimizer.param_groups[0]["lr"]
    return _schedule(optimizer, length, warmup_epochs, "step", lambda rest: lr_scheduler.CyclicLR(
        optimizer, base_lr=base_lr if base_lr is not None else lr / 10, max_lr=max_lr if max_lr is not None else lr,
        step_size_up=step_size_up, mode=mode, gamma=gamma, cycle_momentum=False))


def polynomial(optimizer, length, *, power: float = 1.0, warmup_epochs: int = 0):
    """Polynomial decay to zero over the remaining epochs (power=1 is linear decay); per epoch."""
    from torch.optim import lr_scheduler

    _rates(power=power)
    return _schedule(optimizer, length, warmup_epochs, "epoch",
                     lambda rest: lr_scheduler.PolynomialLR(optimizer, total_iters=max(1, rest.epochs), power=power))


SCHEDULERS = {
    "none": constant,
    "step": step,
    "multistep": multistep,
    "exponential": exponential,
    "plateau": plateau,
    "cosine": cosine,
    "cosine-restarts": cosine_restarts,
    "onecycle": onecycle,
    "cyclic": cyclic,
    "polynomial": polynomial,
}


def _has_momentum(optimizer) -> bool:
    defaults = optimizer.defaults
    return "betas" in defaults or defaults.get("momentum", 0) > 0


def _rates(minimum: float | None = None, **values: float) -> None:
    """Factors of the learning rate (and rates themselves) are > 0: a negative one makes the rate negative, a zero
    one divides by zero; with ``minimum``, rates (``*lr``) are >= it instead."""
    for name, value in values.items():
        if minimum is not None and name.endswith("lr"):
            if value < minimum:
                raise OptiflowError(f"option '{name}' must be >= {minimum:g}, got {value}")
        elif value <= 0:
            raise OptiflowError(f"option '{name}' must be > 0, got {value}")


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise OptiflowError(f"option '{name}' must be >= 1, got {value}")
