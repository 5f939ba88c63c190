"""The training loop: epochs of optimization steps, validation, hooks, metrics and checkpoints.

:func:`fit` runs the epochs; :func:`training_step` builds the function that does one
optimization step on a batch, the part a reader would write by hand::

    x, y = optiflow_train_batch(x, y)   # chained: each implementation gets the previous one's batch
    optimizer.zero_grad(); outputs = model(x); loss = loss_fn(outputs, y) + penalties
    loss.backward(); optiflow_after_backward(...); optimizer.step(); optiflow_after_step(...)

The closure does the second line and the backward pass (it zeroes the gradients first, every time
it is called), so optimizers that re-evaluate the loss (LBFGS, SAM) are stepped with it and work
unchanged; the objective (loss + penalties), the task's plain loss (``train_loss``, whatever the run
trains with) and outputs reported are those of its *first* call, at the weights the step started from.  PyTorch's first-order optimizers (:func:`optiflow.optim.first_order`), which would
call it once, get it called just before their step instead (the same computation), and so does any
optimizer under fp16 autocast, whose GradScaler steps without a closure.  The GradScaler is always
there, a no-op unless fp16: one step path.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from optiflow import checkpoints, distributed, host
from optiflow.data import LoaderBatches, TensorBatches
from optiflow.errors import TrainingError
from optiflow.metrics import hits
from optiflow.optim import first_order
from optiflow.plugins import PluginManager
from optiflow.run import Reporter, Run, is_task_loss, task_loss
from optiflow.schedule import samples_per_batch
from optiflow.signals import deferred
from optiflow.sizing import evaluation_batch_size, evaluation_batches

#: steps between checks that the running training loss is finite and not diverging (each is one host sync)
FINITE_CHECK_STEPS = 16
#: a loss this many times its first check's value, for DIVERGED_CHECKS checks in a row, has diverged
DIVERGED_FACTOR = 1e4
DIVERGED_CHECKS = 3
#: the longest an epoch's metrics wait before they are written to MLflow (short epochs share one write); a run
#: that saves checkpoints writes them right after a checkpoint, at most as often (see checkpoints.save_periodically)
METRIC_FLUSH_SECONDS = 2.0


def fit(run: Run, pm: PluginManager, reporter: Reporter, on_epoch: Callable[[int, dict[str, float]], None] | None,
        check: LossCheck | None = None) -> None:
    """Train from the epoch after ``run.epoch`` to ``config.epochs`` (or an early stop), logging every epoch;
    ``check`` carries on the loss check of epochs trained before (by :mod:`optiflow.stacked`)."""
    host.imports_done(freeze=False)  # the run is alive: its state must not be frozen
    config = run.config
    cluster = distributed.current()
    batches = training_batches(run, cluster)
    step = training_step(run, pm, cluster)
    hook = pm.hook
    classification = run.task == "classification"
    check = check or LossCheck(run)
    reporter.start(config.epochs, len(batches))
    for epoch in range(run.epoch + 1, config.epochs + 1):
        run.epoch = epoch
        run.model.train()
        hook.optiflow_epoch_start(run=run, epoch=epoch)
        started = time.perf_counter()
        lr = run.lr
        check.start_epoch(lr)
        loss_sum, objective_sum, correct, seen = _train_epoch(run, batches, step, check, reporter)
        check(objective_sum, seen)
        loss_total, objective_total, correct_total, seen_total = cluster.sum_floats(
            [loss_sum, objective_sum, correct, seen], run.device)
        metrics = train_metrics(loss_total, objective_total, seen_total, lr, time.perf_counter() - started,
                                correct_total if classification else None)
        if len(run.splits.x_val):
            metrics.update(evaluate(run, run.splits.x_val, run.splits.y_val, "val"))
        metrics = end_epoch(run, pm, epoch, metrics, cluster)
        _record_epoch(run, metrics)
        reporter.epoch(epoch, metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if run.stop_reason:
            run.tracking.set_tags({"stopped_early": run.stop_reason, "stopped_epoch": epoch})
            break


def _train_epoch(run: Run, batches: TensorBatches | LoaderBatches, step: Step, check: LossCheck,
                 reporter: Reporter) -> tuple[Tensor, Tensor, Tensor, int]:
    """One epoch of optimization steps; returns this process's sums of the plain loss and of the objective
    (the same tensor when they are the same), the correct predictions and the samples seen."""
    classification = run.task == "classification"
    step_schedule = run.schedule.interval == "step"
    log_step_loss = run.config.log_step_loss
    loss_sum = torch.zeros((), device=run.device)
    objective_sum = torch.zeros((), device=run.device) if step.separate_objective else loss_sum
    correct = torch.zeros((), device=run.device, dtype=torch.long)
    seen = 0
    for xb, yb in batches:
        run.step += 1
        objective, loss, outputs, xb, yb = step(xb, yb)
        loss_sum.add_(loss, alpha=len(xb))
        if objective_sum is not loss_sum:
            objective_sum.add_(objective, alpha=len(xb))
        if not check.armed:
            check.arm(objective)
        if log_step_loss:
            run.log_metrics({"train_loss_step": float(loss)}, step=run.step)
        if classification:
            correct.add_(hits(outputs, yb).sum())
        seen += len(xb)
        if step_schedule:
            run.schedule.step()
        reporter.batch()
        if run.step % FINITE_CHECK_STEPS == 0:
            check(objective_sum, seen)
    return loss_sum, objective_sum, correct, seen


def train_metrics(loss_sum: float, objective_sum: float, seen: float, lr: float, seconds: float,
                  correct: float | None) -> dict[str, float]:
    """An epoch's training metrics from its sums: ``train_loss`` the task's plain loss, ``train_objective`` what
    the optimizer minimized, ``train_accuracy`` when ``correct`` is counted (classification)."""
    metrics = {"train_loss": loss_sum / max(seen, 1), "train_objective": objective_sum / max(seen, 1), "lr": lr,
               "epoch_time": seconds, "samples_per_sec": seen / seconds}
    if correct is not None:
        metrics["train_accuracy"] = correct / max(seen, 1)
    return metrics


def training_batches(run: Run, cluster: distributed.Cluster) -> TensorBatches | LoaderBatches:
    """In-memory batches when the training split lives on the device, else a DataLoader."""
    config = run.config
    batch_size = samples_per_batch(config.batch_size, len(run.splits.x_train))
    if not run.setup.streamed:
        return TensorBatches(run.splits.x_train, run.splits.y_train, batch_size, shuffle=config.shuffle,
                             drop_last=config.drop_last, generator=run.batch_generator, rank=cluster.rank,
                             world_size=cluster.world_size)
    return LoaderBatches(run.splits.x_train, run.splits.y_train, batch_size, device=run.device,
                         transform=run.augmentation, workers=config.workers, pin_memory=config.pin_memory,
                         shuffle=config.shuffle, drop_last=config.drop_last, generator=run.batch_generator,
                         rank=cluster.rank, world_size=cluster.world_size)


class Step(Protocol):
    """One optimization step: ``step(x, y)`` is ``(objective, loss, outputs, x, y)``."""

    #: whether the objective minimized differs from the task's plain loss (else the same tensor is returned twice)
    separate_objective: bool

    def __call__(self, xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]: ...


def training_step(run: Run, pm: PluginManager, cluster: distributed.Cluster) -> Step:
    """One optimization step on a batch, returning the objective it minimized (the run's loss function plus
    penalties), the task's plain loss (:func:`~optiflow.run.task_loss`) and the outputs (all detached, from
    the first evaluation of the loss) and the batch as trained on (after ``optiflow_train_batch``).

    Built once per run so that the per-step path does no hook look-ups, no
    option checks and no host synchronisation: hooks nobody implements are not
    called, autocast/GradScaler/channels-last/DDP/compile are decided here.
    """
    hook = pm.hook
    transform_batch = batch_transform(pm)
    after_step = hook.optiflow_after_step if hook.optiflow_after_step.get_hookimpls() else None
    optimizer = run.optimizer
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.setup.grad_scaler)
    closure = _LossClosure(run, pm, _training_model(run, cluster), scaler)
    steps_itself = not (first_order(optimizer) or run.setup.grad_scaler)  # calls the closure itself
    channels_last = run.setup.channels_last
    separate_objective = closure.plain is not None or closure.penalties is not None

    def step(xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        if transform_batch is not None:
            xb, yb = transform_batch(run, xb, yb)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        closure.batch, closure.first = (xb, yb), None
        if steps_itself:
            scaler.step(optimizer, closure)
        else:
            closure()
            scaler.step(optimizer)
        scaler.update()
        if after_step is not None:
            after_step(run=run, step=run.step)
        assert closure.first is not None, "the optimizer evaluated the loss"
        objective, loss, outputs = closure.first
        return (objective if separate_objective else loss), loss, outputs, xb, yb

    step.separate_objective = separate_objective  # type: ignore[attr-defined]
    return step  # type: ignore[return-value]


class _LossClosure:
    """The closure an optimizer steps with: zero the gradients, forward, loss + penalties, (scaled) backward,
    ``optiflow_after_backward``; it keeps its first call's objective (loss + penalties), the task's plain loss
    (:func:`~optiflow.run.task_loss`, the loss itself when the run trains with it) and outputs, detached, for the
    loop."""

    def __init__(self, run: Run, pm: PluginManager, model: Callable[[Tensor], Tensor],
                 scaler: torch.amp.GradScaler) -> None:
        hook = pm.hook
        self.run, self.model, self.scaler = run, model, scaler
        self.penalties = hook.optiflow_penalty if hook.optiflow_penalty.get_hookimpls() else None
        self.after_backward = hook.optiflow_after_backward if hook.optiflow_after_backward.get_hookimpls() else None
        self.autocast = run.setup.amp_dtype
        self.plain = None if is_task_loss(run.loss_fn, run.task) else task_loss(run.task)
        self.batch: tuple[Tensor, Tensor] = (torch.empty(0), torch.empty(0))
        self.first: tuple[Tensor, Tensor, Tensor] | None = None

    def __call__(self) -> Tensor:
        run, (xb, yb) = self.run, self.batch
        run.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(run.device.type, dtype=self.autocast) if self.autocast is not None else contextlib.nullcontext():
            outputs = self.model(xb)
            run.last_outputs, run.last_targets = outputs, yb
            loss = run.loss_fn(outputs, yb)
        total = loss
        if self.penalties is not None:
            for penalty in self.penalties(run=run):
                total = total + penalty
        self.scaler.scale(total).backward()
        self.scaler.unscale_(run.optimizer)
        if self.after_backward is not None:
            self.after_backward(run=run, step=run.step)
        if self.first is None:
            if self.plain is not None:
                with torch.no_grad():
                    loss = self.plain(outputs.detach().float(), yb)
            self.first = total.detach(), loss.detach(), outputs.detach()
        return total


def batch_transform(pm: PluginManager) -> Callable[[Run, Tensor, Tensor], tuple[Tensor, Tensor]] | None:
    """The ``optiflow_train_batch`` implementations chained in hook-call order, each called through pluggy
    (traced, its arguments picked) on the batch the previous one returned (None keeps it); None when
    nobody implements the hook.  Pluggy calls every implementation with the same arguments, so the chain
    is a sequence of one-plugin hook callers."""
    impls = list(reversed(pm.hook.optiflow_train_batch.get_hookimpls()))
    if not impls:
        return None
    callers = [pm.subset_hook_caller("optiflow_train_batch", [other.plugin for other in impls if other is not impl])
               for impl in impls]

    def transform(run: Run, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        for call in callers:
            for result in call(run=run, x=x, y=y):
                x, y = result
        return x, y

    return transform


def _training_model(run: Run, cluster: distributed.Cluster) -> Callable[[Tensor], Tensor]:
    """``run.model`` as the training step calls it: DDP-wrapped across processes, compiled on ``--compile``."""
    model: Callable[[Tensor], Tensor] = run.model
    if cluster.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if run.config.compile:
        model = torch.compile(model, dynamic=False)
    return model


class LossCheck:
    """Stops training whose loss is NaN or infinite, or has stayed above ``DIVERGED_FACTOR`` times the
    loss of its first step (the weights as initialized) for ``DIVERGED_CHECKS`` checks in a row: a
    divergence that stays finite (1e15 with ``--lr 1e6``) fails the run instead of finishing it."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.baseline = math.nan
        #: whether the first step's loss is known (:meth:`arm`)
        self.armed = False
        self.strikes = 0
        self.lr = run.lr
        self.last_sum, self.last_seen = 0.0, 0

    def arm(self, first_loss: Tensor | float) -> None:
        """Take the loss of the run's first step as the baseline a diverging loss is measured against."""
        self.baseline, self.armed = max(abs(float(first_loss)), 1e-12), True

    def start_epoch(self, lr: float) -> None:
        self.lr, self.last_sum, self.last_seen = lr, 0.0, 0

    def __call__(self, loss_sum: Tensor, seen: int) -> None:
        total = float(loss_sum)
        run = self.run
        where = f"at step {run.step} (epoch {run.epoch}, lr={self.lr:g})"
        advice = "lower the learning rate or add gradient clipping (--reg grad-clip)"
        if not math.isfinite(total):
            raise TrainingError(f"the training loss became {total} {where}: {advice}")
        if seen <= self.last_seen:
            return
        window = (total - self.last_sum) / (seen - self.last_seen)
        self.last_sum, self.last_seen = total, seen
        if not math.isfinite(self.baseline):
            return
        self.strikes = self.strikes + 1 if window > DIVERGED_FACTOR * max(self.baseline, 1.0) else 0
        if self.strikes >= DIVERGED_CHECKS:
            raise TrainingError(f"the training loss diverged to {window:.3g} {where}, over {DIVERGED_FACTOR:g} times "
                                f"its first step's {self.baseline:.3g}: {advice}")


def end_epoch(run: Run, pm: PluginManager, epoch: int, metrics: dict[str, float],
              cluster: distributed.Cluster) -> dict[str, float]:
    """What follows an epoch's metrics, for one run or each of K stacked ones: the validation-end hook, rank 0's
    metrics on every process, an epoch-interval scheduler's step, the epoch-end hook, rank 0's stop decision.
    Returns the metrics every process records."""
    pm.hook.optiflow_validation_end(run=run, epoch=epoch, metrics=metrics)
    metrics = cluster.share(metrics)
    if run.schedule.interval == "epoch":
        run.schedule.step(metrics)
    pm.hook.optiflow_epoch_end(run=run, epoch=epoch, metrics=metrics)
    run.stop_reason = cluster.share(run.stop_reason)
    return metrics


def record_metrics(run: Run, metrics: dict[str, float]) -> None:
    """Add the epoch's metrics to the run's history and log them at step ``run.epoch``."""
    for key, value in metrics.items():
        run.history.setdefault(key, []).append(value)
    run.tracking.log_metrics(metrics, step=run.epoch, flush=False)


def _record_epoch(run: Run, metrics: dict[str, float]) -> None:
    """Log the epoch's metrics and keep a checkpoint of it, as one step no signal can split."""
    with deferred():
        record_metrics(run, metrics)
        run.checkpoint = checkpoints.capture(run)
        checkpoints.save_periodically(run, METRIC_FLUSH_SECONDS)


def evaluate(run: Run, x: Tensor, y: Tensor, prefix: str) -> dict[str, float]:
    """The task's plain loss (:func:`~optiflow.run.task_loss`, whatever the run trains with) and accuracy, or
    RMSE/R² for regression, of the model on ``x``, ``y`` in eval mode."""
    return score(run, x, y, prefix, keep=False)[0]


def score(run: Run, x: Tensor, y: Tensor, prefix: str, keep: bool = True) -> tuple[dict[str, float], Tensor | None]:
    """:func:`evaluate`'s metrics and (``keep``) the model's outputs on ``x``, row by row."""
    model = run.model
    loss_fn = task_loss(run.task)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), device=run.device, dtype=torch.long)
    outputs_all = []
    with torch.no_grad():
        for xb, yb in evaluation_batches(x, y, evaluation_batch_size(model, x)):
            outputs = model(xb)
            loss_sum += loss_fn(outputs.float(), yb) * len(xb)
            if run.task == "classification":
                correct += hits(outputs, yb).sum()
            if keep or run.task != "classification":
                outputs_all.append(outputs if run.task == "classification" else outputs.reshape(yb.shape))
    model.train(was_training)
    n = max(len(x), 1)
    metrics = {f"{prefix}_loss": float(loss_sum) / n}
    if run.task == "classification":
        metrics[f"{prefix}_accuracy"] = float(correct) / n
    elif outputs_all:
        predictions = torch.cat(outputs_all)
        residual = ((predictions - y) ** 2).sum()
        total = ((y - y.mean()) ** 2).sum().clamp_min(1e-12)
        metrics[f"{prefix}_rmse"] = float(torch.sqrt(residual / n))
        metrics[f"{prefix}_r2"] = float(1 - residual / total)
    return metrics, (torch.cat(outputs_all) if keep and outputs_all else None)
