"""Several runs of one small model trained at once, as one stacked model: the folds of a cross-validated trial.

The folds of one trial share the architecture, the initial weights (each run seeds its model alike), the
optimizer and its hyper-parameters; only their data differ.  :func:`fit_stacked` keeps every layer's weights
of the K runs in one tensor ``[K, ...]`` and does each optimization step of all K at once: one batched
matrix product per layer, one backward pass, one optimizer step.  Each run still draws its batches from its
own generator (the same permutations as alone), computes its loss with its own loss function, is validated
on its own split and sees every epoch hook with its own weights and gradients.  The result is the runs' own
trainings up to floating-point rounding (batched products may sum in another order); tests check it.

Only what is provably the same computation is stacked (:func:`why_not_stacked`): a ``Sequential`` of
``Flatten``, ``Linear`` and element-wise activations, an element-wise first-order optimizer, no scheduler,
no regularizer, augmentation, per-step or epoch-start hook, mixed precision or data parallelism, the same number of
batches per epoch.  Runs that stop training alike on the way (an epoch hook stops some early or changes a
learning rate) get their weights and optimizer state back and go on one by one in :func:`optiflow.loop.fit`.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from optiflow import distributed, host
from optiflow.data import TensorBatches
from optiflow.loop import FINITE_CHECK_STEPS, LossCheck, end_epoch, evaluate, fit, record_metrics, train_metrics
from optiflow.metrics import hits
from optiflow.optim import first_order
from optiflow.plugins import PluginManager
from optiflow.run import Run, SilentReporter, is_task_loss, task_loss
from optiflow.schedule import samples_per_batch
from optiflow.stacked_model import (
    add_plain,
    forward,
    layer_params,
    mlp_layers,
    padded,
    signature,
    stacked_loss,
    stacked_validation,
)

#: hooks called per step (a plugin implementing one sees a run's batches) or as an epoch starts (where it may
#: change one run's learning rate for that epoch): their runs are not stacked
UNSTACKABLE_HOOKS = ("optiflow_train_batch", "optiflow_penalty", "optiflow_after_backward", "optiflow_after_step",
                     "optiflow_epoch_start")

#: an epoch's training sums: loss ``[K]``, correct predictions ``[K]``, samples seen per run
EpochSums = tuple[Tensor, Tensor, Tensor, list[int]]


def why_not_stacked(runs: list[Run], pm: PluginManager) -> str | None:
    """None when ``runs`` can train as one stacked model, else why not."""
    first = runs[0]
    if len(runs) < 2:
        return "one run"
    if distributed.current().enabled:
        return "data parallel"
    for name in UNSTACKABLE_HOOKS:
        if getattr(pm.hook, name).get_hookimpls():
            return f"a plugin implements {name}"
    for run in runs:
        config, setup = run.config, run.setup
        if run.regularizers or run.augmentation is not None or config.log_step_loss or config.compile:
            return "regularizers, augmentation, per-step logging or compile"
        if setup.streamed or setup.amp_dtype is not None or setup.channels_last or run.device != first.device:
            return "streamed batches, mixed precision or channels-last"
        if run.schedule.scheduler is not None:
            return "a learning-rate scheduler"
        if mlp_layers(run.model) is None or signature(run.model) != signature(first.model):
            return "not a plain MLP (Flatten, Linear, element-wise activations) or not the same one"
        if not first_order(run.optimizer) or run.optimizer.state:
            return "not an element-wise first-order optimizer"
        if _groups(run.optimizer, run.model) != _groups(first.optimizer, first.model):
            return "different optimizer settings"
        if (config.batch_size, config.epochs, config.shuffle, config.drop_last) != (
                first.config.batch_size, first.config.epochs, first.config.shuffle, first.config.drop_last):
            return "different batches or epochs"
        if run.epoch or run.history:
            return "a resumed run"
    if len({len(_batches(run)) for run in runs}) > 1:
        return "not the same number of batches per epoch"
    return None


def fit_stacked(runs: list[Run], pm: PluginManager) -> None:
    """Train ``runs`` (checked by :func:`why_not_stacked`) to their last epoch as one stacked model.

    Each run's history, epoch, step, metrics and epoch hooks are as if it had trained alone; its metrics go
    to ``run.tracker`` (a tracker whose run opens once they finish).  Runs that stop training alike (a hook stops some
    early, a learning rate differs) go on one by one from where they are.  Raises what training raises
    (TrainingError when one diverges, what a hook raises).
    """
    host.imports_done(freeze=False)  # the run is alive: its state must not be frozen
    stack = _Stack(runs)
    checks = [LossCheck(run) for run in runs]
    hook = pm.hook
    validate = stacked_validation(runs, stack.layers) if stack.masked is not None and stack.classification else None
    for epoch in range(1, runs[0].config.epochs + 1):
        if len({run.lr for run in runs}) > 1:
            _go_on_apart(stack, checks, pm)
            return
        for run, check in zip(runs, checks):
            run.epoch = epoch
            run.model.train()
            hook.optiflow_epoch_start(run=run, epoch=epoch)
            check.start_epoch(run.lr)
        stack.sync_lr()
        started = time.perf_counter()
        sums = stack.train_epoch(checks)
        seconds = time.perf_counter() - started
        stack.copy_back()
        _end_epoch(runs, checks, pm, epoch, sums, seconds, validate(stack.params) if validate else None)
        stopped = [run for run in runs if run.stop_reason]
        for run in stopped:
            run.tracking.set_tags({"stopped_early": run.stop_reason, "stopped_epoch": epoch})
        if len(stopped) == len(runs):
            return
        if stopped:
            _go_on_apart(stack, checks, pm)
            return


def _end_epoch(runs: list[Run], checks: list[LossCheck], pm: PluginManager, epoch: int, sums: EpochSums,
               seconds: float, validation: list[dict[str, float]] | None) -> None:
    """Each run's epoch metrics (its validation from ``validation`` or its own pass), epoch-end hooks, history."""
    objective_sums, loss_sums, correct, seen = sums
    classification = runs[0].task == "classification"
    cluster = distributed.current()  # one process: stacking refuses torchrun
    for j, (run, check) in enumerate(zip(runs, checks)):
        check(objective_sums[j], seen[j])
        metrics = train_metrics(float(loss_sums[j]), float(objective_sums[j]), seen[j], run.lr, seconds,
                                float(correct[j]) if classification else None)
        if validation is not None:
            metrics.update(validation[j])
        elif len(run.splits.x_val):
            metrics.update(evaluate(run, run.splits.x_val, run.splits.y_val, "val"))
        record_metrics(run, end_epoch(run, pm, epoch, metrics, cluster))


def _go_on_apart(stack: _Stack, checks: list[LossCheck], pm: PluginManager) -> None:
    """The runs not stopped train their remaining epochs one by one in the one loop, from their weights and
    optimizer state as the stacked training left them."""
    stack.hand_back()
    for run, check in zip(stack.runs, checks):
        if not run.stop_reason:
            fit(run, pm, SilentReporter(), None, check=check)


class _Stack:
    """The K runs' Linear weights stacked ``[K, ...]``, the run's optimizer over them, their batches and losses."""

    def __init__(self, runs: list[Run]) -> None:
        first = runs[0]
        layers = mlp_layers(first.model)
        assert layers is not None, "why_not_stacked refuses a model that is not a plain MLP"
        self.runs, self.layers = runs, layers
        self.per_run = [layer_params(run.model) for run in runs]
        self.params = [torch.stack([ps[i].detach() for ps in self.per_run]).clone().requires_grad_(True)
                       for i in range(len(self.per_run[0]))]
        self.optimizer = _stacked_optimizer(first, self.params)
        self.step_optimizer = _FusedAdamStep(self.optimizer)
        self.batches = [_batches(run) for run in runs]
        self.batch_size, self.steps = self.batches[0].batch_size, len(self.batches[0])
        self.loss, self.masked = stacked_loss(runs)
        #: the task's plain loss, for ``train_loss``, when a run trains with another (smoothing, MSE on classes)
        self.plain = None if all(is_task_loss(run.loss_fn, run.task) for run in runs) else task_loss(first.task)
        self.classification = first.task == "classification"

    def train_epoch(self, checks: list[LossCheck]) -> EpochSums:
        """One epoch of every run, step by step, each on its own batches; checks the losses as the loop does."""
        runs, size = self.runs, self.batch_size
        orders = [batches.order()[: self.steps * size] for batches in self.batches]
        xs = [run.splits.x_train[order] for run, order in zip(runs, orders)]
        ys = [run.splits.y_train[order] for run, order in zip(runs, orders)]
        sizes = [len(x) for x in xs]
        together = (padded(xs), padded(ys)) if self.masked is not None or len(set(sizes)) == 1 else None
        loss_sums = torch.zeros(len(runs), device=runs[0].device)
        plain_sums = loss_sums if self.plain is None else torch.zeros(len(runs), device=runs[0].device)
        correct = torch.zeros(len(runs), device=runs[0].device, dtype=torch.long)
        step = runs[0].step
        for i in range(self.steps):
            start, end = i * size, (i + 1) * size
            counts = [max(0, min(end, n) - start) for n in sizes]
            self.optimizer.zero_grad(set_to_none=True)
            if together is not None and (self.masked is not None or len(set(counts)) == 1):
                yb = together[1][:, start:end]
                outputs, losses = self._padded_step(together[0][:, start:end], yb, counts, loss_sums, correct)
                targets = list(yb) if self.plain is not None else []
            else:  # the last batch of runs whose training splits differ in size: one graph per run
                targets = [y[start:end] for y in ys]
                outputs, losses = self._ragged_step([x[start:end] for x in xs], targets, counts, loss_sums, correct)
            if self.plain is not None:
                add_plain(plain_sums, self.plain, outputs, targets, counts)
            step += 1
            if not checks[0].armed:
                for check, value in zip(checks, losses.tolist()):
                    check.arm(value)
            if step % FINITE_CHECK_STEPS == 0:
                for j, (run, check) in enumerate(zip(runs, checks)):
                    run.step = step
                    check(loss_sums[j], min(sizes[j], end))
        for run in runs:
            run.step = step
        return loss_sums, plain_sums, correct, [min(n, self.steps * size) for n in sizes]

    def _padded_step(self, xb: Tensor, yb: Tensor, counts: list[int], loss_sums: Tensor,
                     correct: Tensor) -> tuple[list[Tensor], Tensor]:
        """One step of all K on batches ``[K, B, ...]``; the last batches of splits that differ in size are
        padded, and padding weighs 0.  Returns each run's outputs (detached; only when the plain task loss is
        summed apart, else none) and the K losses."""
        outputs = forward(self.layers, self.params, xb)
        valid = None
        if len(set(counts)) == 1:
            losses = self.loss(outputs, yb)
            loss_sums.add_(losses.detach(), alpha=counts[0])
        else:
            assert self.masked is not None
            valid = torch.arange(len(xb[0]), device=xb.device) < torch.tensor(counts, device=xb.device)[:, None]
            losses = self.masked(outputs, yb, valid)
            loss_sums.add_(losses.detach() * torch.tensor(counts, device=xb.device, dtype=losses.dtype))
        losses.sum().backward()
        self.step_optimizer()
        if self.classification:
            right = hits(outputs.detach(), yb)
            correct.add_((right if valid is None else right & valid).sum(1))
        return list(outputs.detach()) if self.plain is not None else [], losses

    def _ragged_step(self, xs: list[Tensor], ys: list[Tensor], counts: list[int], loss_sums: Tensor,
                     correct: Tensor) -> tuple[list[Tensor], Tensor]:
        """One step of all K whose batches differ in size and cannot be padded: one graph per run.  Returns each
        run's outputs (detached) and the K losses."""
        outs = [forward(self.layers, [p[j:j + 1] for p in self.params], x.unsqueeze(0))[0] for j, x in enumerate(xs)]
        losses = torch.stack([run.loss_fn(out, y) for run, out, y in zip(self.runs, outs, ys)])
        losses.sum().backward()
        self.step_optimizer()
        for j, (out, target) in enumerate(zip(outs, ys)):
            loss_sums[j].add_(losses[j].detach(), alpha=counts[j])
            if self.classification:
                correct[j] += hits(out.detach(), target).sum()
        return [out.detach() for out in outs], losses

    def sync_lr(self) -> None:
        for target, group in zip(self.optimizer.param_groups, self.runs[0].optimizer.param_groups):
            target["lr"] = group["lr"]

    def copy_back(self) -> None:
        """Each run's model gets its slice of the stacked weights, and of their last gradients (epoch hooks read
        both: the diagnostics plugin measures the gradient flow)."""
        with torch.no_grad():
            for i, stacked in enumerate(self.params):
                for j, own in enumerate(self.per_run):
                    own[i].copy_(stacked[j])
                    own[i].grad = None if stacked.grad is None else stacked.grad[j].clone()

    def hand_back(self) -> None:
        """Each run's model and optimizer as if it had trained alone: its weights, and its slice of the
        optimizer's state (moments, momentum; the step count is every run's)."""
        self.copy_back()
        for j, run in enumerate(self.runs):
            for stacked, own in zip(self.params, self.per_run[j]):
                state = self.optimizer.state.get(stacked)
                if state:
                    run.optimizer.state[own] = {
                        key: (value[j].clone() if value.shape == stacked.shape else value.clone())
                        if isinstance(value, Tensor) else value for key, value in state.items()}


class _FusedAdamStep:
    """``optimizer.step()`` for a fused Adam or AdamW without the Python it wraps around its kernel on every call
    (the profiler record, hook loops, the state gathered and grouped again): the same two calls torch's fused Adam
    makes (``_foreach_add_`` on the step counts, then ``_fused_adam_`` / ``_fused_adamw_``) with the same
    arguments, so the same update bit for bit.  The first step, and every step of any other optimizer, or once
    hooks, a gradient scaler, a tensor hyper-parameter or a missing gradient appear, is ``optimizer.step()``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.groups: list[tuple[dict, list[Tensor], list[list[Tensor]]]] | None = None
        self.direct = type(optimizer) in (torch.optim.Adam, torch.optim.AdamW) and all(
            group.get("fused") and not group.get("capturable") and not group.get("differentiable")
            and "decoupled_weight_decay" in group for group in optimizer.param_groups)

    def __call__(self) -> None:
        from torch.optim import optimizer as base

        optimizer, groups = self.optimizer, self.groups
        if (groups is None or optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
                or base._global_optimizer_pre_hooks or base._global_optimizer_post_hooks
                or getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None):
            optimizer.step()
            if self.direct and groups is None:
                self.groups = self._gather()
                self.direct = self.groups is not None
            return
        grads = [[p.grad for p in params] for _, params, _ in groups]
        if any(g is None for group_grads in grads for g in group_grads) or any(
                isinstance(group["lr"], Tensor) or any(isinstance(b, Tensor) for b in group["betas"])
                for group, _, _ in groups):
            optimizer.step()
            return
        with torch.no_grad():
            for (group, params, (exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)), group_grads in zip(groups, grads):
                torch._foreach_add_(steps, 1)
                kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
                beta1, beta2 = group["betas"]
                kernel(params, group_grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,  # type: ignore[arg-type]
                       amsgrad=group["amsgrad"],
                       lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                       maximize=group["maximize"], grad_scale=None, found_inf=None)

    def _gather(self) -> list[tuple[dict, list[Tensor], list[list[Tensor]]]] | None:
        """Each group's parameters and state lists, as the first ``step()`` created them; None when a parameter
        has no state yet or the tensors are not all of one device and dtype (torch would group them)."""
        optimizer, groups = self.optimizer, []
        kinds = {(p.device, p.dtype) for group in optimizer.param_groups for p in group["params"]}
        for group in optimizer.param_groups:
            states = [optimizer.state.get(p) or {} for p in group["params"]]
            if len(kinds) != 1 or not all(states):
                return None
            lists = [[state[key] for state in states] for key in ("exp_avg", "exp_avg_sq")]
            lists.append([state["max_exp_avg_sq"] for state in states] if group["amsgrad"] else [])
            lists.append([state["step"] for state in states])
            groups.append((group, list(group["params"]), lists))
        return groups


def _groups(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[tuple[tuple[int, ...], tuple[tuple[str, str], ...]]]:
    """The optimizer's groups as (parameter positions in the model, hyper-parameters)."""
    position = {id(p): i for i, p in enumerate(layer_params(model))}
    return [(tuple(position.get(id(p), -1) for p in group["params"]),
             tuple(sorted((key, repr(value)) for key, value in group.items() if key != "params")))
            for group in optimizer.param_groups]


def _stacked_optimizer(run: Run, params: list[Tensor]) -> torch.optim.Optimizer:
    """The run's optimizer (class and every group's settings) over the stacked parameters."""
    position = {id(p): i for i, p in enumerate(layer_params(run.model))}
    groups = [{**{key: value for key, value in group.items() if key != "params"},
               "params": [params[position[id(p)]] for p in group["params"]]}
              for group in run.optimizer.param_groups]
    optimizer: torch.optim.Optimizer = type(run.optimizer)(groups)  # type: ignore[call-arg]
    if any(group.get("fused") for group in groups):
        optimizer._step_supports_amp_scaling = True  # type: ignore[attr-defined]
    return optimizer


def _batches(run: Run) -> TensorBatches:
    config = run.config
    return TensorBatches(run.splits.x_train, run.splits.y_train,
                         samples_per_batch(config.batch_size, len(run.splits.x_train)), shuffle=config.shuffle,
                         drop_last=config.drop_last, generator=run.batch_generator)
