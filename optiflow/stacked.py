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
no regularizer, augmentation, batch-level hook, mixed precision or data parallelism, the same number of
batches per epoch.  Anything else is trained run by run, as before.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from optiflow import distributed
from optiflow.loop import FINITE_CHECK_STEPS, LossCheck, evaluate
from optiflow.run import Run, is_task_loss, task_loss

#: element-wise activations: applied to ``[K, B, H]`` they act on each run's batch alone
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus,
               nn.Identity)
#: optimizers whose update is element-wise per parameter: stepping ``[K, ...]`` steps each run alone
ELEMENTWISE_OPTIMIZERS = ("SGD", "Adam", "AdamW", "Adamax", "Adagrad", "Adadelta", "RMSprop", "NAdam", "RAdam")
#: hooks called per step: a plugin implementing one sees a run's batches, so its runs are not stacked
STEP_HOOKS = ("optiflow_train_batch", "optiflow_penalty", "optiflow_after_backward", "optiflow_after_step")


class NotStacked(Exception):
    """The runs cannot be (or stop being) trained as one: train them one by one instead."""


def why_not_stacked(runs: list[Run], pm: Any) -> str | None:
    """None when ``runs`` can train as one stacked model, else why not."""
    first = runs[0]
    if len(runs) < 2:
        return "one run"
    if distributed.current().enabled:
        return "data parallel"
    for name in STEP_HOOKS:
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
        if _layers(run.model) is None or _signature(run.model) != _signature(first.model):
            return "not a plain MLP (Flatten, Linear, element-wise activations) or not the same one"
        optimizer = run.optimizer
        if type(optimizer).__name__ not in ELEMENTWISE_OPTIMIZERS or type(optimizer).__module__.split(".")[:2] != [
                "torch", "optim"] or optimizer.state:
            return "not an element-wise first-order optimizer"
        if _groups(optimizer, run.model) != _groups(first.optimizer, first.model):
            return "different optimizer settings"
        if (config.batch_size, config.epochs, config.shuffle, config.drop_last) != (
                first.config.batch_size, first.config.epochs, first.config.shuffle, first.config.drop_last):
            return "different batches or epochs"
        if run.epoch or run.history:
            return "a resumed run"
    if len({len(_batches(run)) for run in runs}) > 1:
        return "not the same number of batches per epoch"
    return None


def fit_stacked(runs: list[Run], pm: Any) -> None:
    """Train ``runs`` (checked by :func:`why_not_stacked`) to their last epoch as one stacked model.

    Each run's history, epoch, step, metrics and epoch hooks are as if it had trained alone; its metrics go
    to ``run.tracker`` (a recorder: the caller logs them).  Raises :class:`NotStacked` when the runs stop
    training alike (a hook stops one early, a learning rate differs), TrainingError when one diverges.
    """
    k = len(runs)
    first = runs[0]
    per_run = [_layer_params(run.model) for run in runs]
    params = [torch.stack([ps[i].detach() for ps in per_run]).clone().requires_grad_(True)
              for i in range(len(per_run[0]))]
    optimizer = _stacked_optimizer(first, params)
    layers = _layers(first.model)
    assert layers is not None
    batches = [_batches(run) for run in runs]
    batch_size = batches[0].batch_size
    steps = len(batches[0])
    classification = first.task == "classification"
    checks = [LossCheck(run) for run in runs]
    hook = pm.hook
    loss, masked = _stacked_loss(runs)
    plain = None if all(is_task_loss(run.loss_fn, run.task) for run in runs) else task_loss(first.task)
    validate = _stacked_validation(runs, layers) if masked is not None and classification else None
    step = first.step
    for epoch in range(1, first.config.epochs + 1):
        lrs = {run.lr for run in runs}
        if len(lrs) > 1:
            raise NotStacked("the runs' learning rates differ")
        for run, check in zip(runs, checks):
            run.epoch = epoch
            run.model.train()
            hook.optiflow_epoch_start(run=run, epoch=epoch)
            check.start_epoch(run.lr)
        _sync_lr(optimizer, first.optimizer)
        started = time.perf_counter()
        orders = [_order(run, b) for run, b in zip(runs, batches)]
        xs = [run.splits.x_train[order] for run, order in zip(runs, orders)]
        ys = [run.splits.y_train[order] for run, order in zip(runs, orders)]
        sizes = [len(x) for x in xs]
        x_all, y_all = (_padded(xs), _padded(ys)) if masked is not None or len(set(sizes)) == 1 else (None, None)
        loss_sums = torch.zeros(k, device=first.device)
        plain_sums = torch.zeros(k, device=first.device)
        correct = torch.zeros(k, device=first.device, dtype=torch.long)
        for i in range(steps):
            start, end = i * batch_size, (i + 1) * batch_size
            counts = [max(0, min(end, n) - start) for n in sizes]
            optimizer.zero_grad(set_to_none=True)
            if x_all is not None and y_all is not None and (masked is not None or len(set(counts)) == 1):
                xb, yb = x_all[:, start:end], y_all[:, start:end]
                outputs = _forward(layers, params, xb)
                if len(set(counts)) == 1:
                    losses = loss(outputs, yb)
                    loss_sums.add_(losses.detach(), alpha=counts[0])
                else:  # the last batches of training splits that differ in size, padded: padding weighs 0
                    assert masked is not None
                    valid = torch.arange(len(xb[0]), device=xb.device) < torch.tensor(counts, device=xb.device)[:, None]
                    losses = masked(outputs, yb, valid)
                    loss_sums.add_(losses.detach() * torch.tensor(counts, device=xb.device, dtype=losses.dtype))
                losses.sum().backward()
                optimizer.step()
                if plain is not None:
                    _add_plain(plain_sums, plain, list(outputs.detach()), list(yb), counts)
                if classification:
                    hits = outputs.detach().argmax(2) == (yb if yb.ndim == 2 else yb.argmax(2))
                    correct.add_((hits if len(set(counts)) == 1 else hits & valid).sum(1))
            else:  # the last batch of runs whose training splits differ in size: one graph per run
                outs, loss_list = [], []
                for j, run in enumerate(runs):
                    out = _forward(layers, [p[j:j + 1] for p in params], xs[j][start:end].unsqueeze(0))[0]
                    outs.append(out)
                    loss_list.append(run.loss_fn(out, ys[j][start:end]))
                losses = torch.stack(loss_list)
                losses.sum().backward()
                optimizer.step()
                if plain is not None:
                    _add_plain(plain_sums, plain, [out.detach() for out in outs], [y[start:end] for y in ys], counts)
                for j in range(k):
                    loss_sums[j].add_(losses[j].detach(), alpha=counts[j])
                    if classification:
                        target = ys[j][start:end]
                        correct[j] += (outs[j].detach().argmax(1) == (target if target.ndim == 1 else target.argmax(1))).sum()
            step += 1
            if checks[0].baseline is None:
                for check, value in zip(checks, losses.tolist()):
                    check.baseline = max(abs(value), 1e-12)
            if step % FINITE_CHECK_STEPS == 0:
                for j, (run, check) in enumerate(zip(runs, checks)):
                    run.step = step
                    check(loss_sums[j], min(sizes[j], end))
        seen = [min(n, steps * batch_size) for n in sizes]
        for run in runs:
            run.step = step
        seconds = time.perf_counter() - started
        _copy_back(params, per_run)
        validation = validate(params) if validate is not None else None
        for j, (run, check) in enumerate(zip(runs, checks)):
            check(loss_sums[j], seen[j])
            objective = float(loss_sums[j]) / max(seen[j], 1)
            train_loss = objective if plain is None else float(plain_sums[j]) / max(seen[j], 1)
            metrics: dict[str, Any] = {"train_loss": train_loss, "train_objective": objective, "lr": run.lr,
                                       "epoch_time": seconds, "samples_per_sec": seen[j] / seconds}
            if classification:
                metrics["train_accuracy"] = float(correct[j]) / max(seen[j], 1)
            if validation is not None:
                metrics.update(validation[j])
            elif len(run.splits.x_val):
                metrics.update(evaluate(run, run.splits.x_val, run.splits.y_val, "val"))
            hook.optiflow_validation_end(run=run, epoch=epoch, metrics=metrics)
            hook.optiflow_epoch_end(run=run, epoch=epoch, metrics=metrics)
            for key, value in metrics.items():
                run.history.setdefault(key, []).append(value)
            run.tracker.log_metrics(metrics, step=epoch, flush=False)
        stopped = {run.stop_reason for run in runs}
        if len(stopped) > 1:
            raise NotStacked("a hook stopped some of the runs early")
        if stopped != {None}:
            for run in runs:
                run.tracker.set_tags({"stopped_early": run.stop_reason, "stopped_epoch": epoch})
            break


def _stacked_validation(runs: list[Run], layers: list[nn.Module]) -> Any:
    """For the plain cross-entropy on classes: ``validate(params)``, every run's ``val_loss`` and
    ``val_accuracy`` from one forward pass over the K validation splits (padded to one length), as
    ``loop.evaluate`` computes them run by run; None when a run has no validation split."""
    if any(not len(run.splits.x_val) or run.splits.y_val.ndim != 1 for run in runs):
        return None
    x_val, y_val = _padded([run.splits.x_val for run in runs]), _padded([run.splits.y_val for run in runs])
    sizes = torch.tensor([len(run.splits.x_val) for run in runs], device=x_val.device)
    valid = torch.arange(x_val.shape[1], device=x_val.device) < sizes[:, None]
    def validate(params: list[Tensor]) -> list[dict[str, float]]:
        with torch.no_grad():
            outputs = _forward(layers, params, x_val)
            per_sample = torch.nn.functional.cross_entropy(outputs.flatten(0, 1), y_val.flatten(),
                                                           reduction="none").view(y_val.shape)
            losses = ((per_sample * valid).sum(1) / sizes).tolist()
            correct = ((outputs.argmax(2) == y_val) & valid).sum(1).tolist()
        return [{"val_loss": loss, "val_accuracy": hits / int(n)} for loss, hits, n in zip(losses, correct, sizes)]

    return validate


def _add_plain(sums: Tensor, plain: Any, outputs: list[Tensor], targets: list[Tensor], counts: list[int]) -> None:
    """Add each run's plain task loss on its real samples of this batch (``counts[j]`` of them) to ``sums[j]``."""
    with torch.no_grad():
        for j, count in enumerate(counts):
            if count:
                sums[j] += plain(outputs[j][:count].float(), targets[j][:count]) * count


def _padded(tensors: list[Tensor]) -> Tensor:
    """``[K, max length, ...]``: the tensors stacked, the shorter ones padded with zeros at the end."""
    longest = max(len(t) for t in tensors)
    out = tensors[0].new_zeros((len(tensors), longest, *tensors[0].shape[1:]))
    for index, tensor in enumerate(tensors):
        out[index, : len(tensor)] = tensor
    return out


def _stacked_loss(runs: list[Run]) -> tuple[Any, Any]:
    """The K runs' losses on outputs ``[K, B, C]`` and targets ``[K, B, ...]``: one cross-entropy over all K
    batches when every run's loss is PyTorch's plain one (per-sample losses, averaged per run), else each
    run's own loss function on its slice.  Second, for the plain one only, the same on batches padded to
    one length (``valid`` ``[K, B]`` marks the real samples; padding gets no weight and no gradient)."""
    functions: list[Any] = [run.loss_fn for run in runs]
    plain = all(type(f) is nn.CrossEntropyLoss and f.weight is None and f.reduction == "mean" and f.ignore_index == -100
                and f.label_smoothing == functions[0].label_smoothing for f in functions)
    if plain:
        smoothing = float(functions[0].label_smoothing)

        def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
            if targets.ndim != 2:
                return torch.stack([f(outputs[j], targets[j]) for j, f in enumerate(functions)])
            per_sample = torch.nn.functional.cross_entropy(outputs.flatten(0, 1), targets.flatten(),
                                                           reduction="none", label_smoothing=smoothing)
            return per_sample.view(targets.shape).mean(1)

        def masked(outputs: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
            per_sample = torch.nn.functional.cross_entropy(outputs.flatten(0, 1), targets.flatten(),
                                                           reduction="none", label_smoothing=smoothing)
            return (per_sample.view(targets.shape) * valid).sum(1) / valid.sum(1)

        return cross_entropy, masked
    return (lambda outputs, targets: torch.stack([f(outputs[j], targets[j]) for j, f in enumerate(functions)]),
            None)


def _forward(layers: list[nn.Module], params: list[Tensor], x: Tensor) -> Tensor:
    """The stacked model on ``x`` of shape ``[K, B, ...]``: each Linear layer's weight and bias (if any) come
    next from ``params``."""
    h = x.flatten(2) if x.ndim > 3 else x
    index = 0
    for layer in layers:
        if isinstance(layer, nn.Linear):
            weight = params[index]
            index += 1
            if layer.bias is not None:
                h = torch.baddbmm(params[index].unsqueeze(1), h, weight.transpose(1, 2))
                index += 1
            else:
                h = torch.bmm(h, weight.transpose(1, 2))
        elif isinstance(layer, nn.Flatten):
            h = h.flatten(2)
        else:
            h = layer(h)
    return h


def _layers(model: nn.Module) -> list[nn.Module] | None:
    """The model's layers when it is a plain MLP (a Sequential of Flatten first, Linear, element-wise
    activations), else None."""
    if not isinstance(model, nn.Sequential):
        return None
    layers = list(model)
    for index, layer in enumerate(layers):
        if isinstance(layer, nn.Flatten):
            if index != 0 or layer.start_dim != 1 or layer.end_dim != -1:
                return None
        elif type(layer) is not nn.Linear and type(layer) not in ELEMENTWISE:
            return None
    if any(not p.requires_grad for p in model.parameters()) or any(True for _ in model.buffers()):
        return None
    return layers


def _layer_params(model: nn.Module) -> list[Tensor]:
    layers: Any = model
    return [p for layer in layers if isinstance(layer, nn.Linear) for p in (layer.weight, layer.bias) if p is not None]


def _signature(model: nn.Module) -> list[Any]:
    return [(type(layer).__name__, repr(layer)) for layer in model] if isinstance(model, nn.Sequential) else []


def _groups(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[tuple[Any, ...]]:
    """The optimizer's groups as (parameter positions in the model, hyper-parameters)."""
    position = {id(p): i for i, p in enumerate(_layer_params(model))}
    return [(tuple(position.get(id(p), -1) for p in group["params"]),
             tuple(sorted((key, repr(value)) for key, value in group.items() if key != "params")))
            for group in optimizer.param_groups]


def _stacked_optimizer(run: Run, params: list[Tensor]) -> torch.optim.Optimizer:
    """The run's optimizer (class and every group's settings) over the stacked parameters."""
    position = {id(p): i for i, p in enumerate(_layer_params(run.model))}
    groups = [{**{key: value for key, value in group.items() if key != "params"},
               "params": [params[position[id(p)]] for p in group["params"]]}
              for group in run.optimizer.param_groups]
    kind: Any = type(run.optimizer)
    optimizer = kind(groups)
    if any(group.get("fused") for group in groups):
        flagged: Any = optimizer
        flagged._step_supports_amp_scaling = True
    return optimizer


def _sync_lr(stacked: torch.optim.Optimizer, source: torch.optim.Optimizer) -> None:
    for target, group in zip(stacked.param_groups, source.param_groups):
        target["lr"] = group["lr"]


def _batches(run: Run) -> Any:
    from optiflow.data import TensorBatches

    config = run.config
    size = len(run.splits.x_train) if config.batch_size == "full" else int(config.batch_size)
    return TensorBatches(run.splits.x_train, run.splits.y_train, size, shuffle=config.shuffle,
                         drop_last=config.drop_last, generator=run.batch_generator)


def _order(run: Run, batches: Any) -> Tensor:
    """The epoch's sample order, drawn from the run's generator exactly as ``TensorBatches`` draws it,
    cut to the samples its batches cover."""
    n = len(run.splits.x_train)
    if batches.shuffle:
        order = torch.randperm(n, generator=run.batch_generator).to(run.splits.x_train.device)
    else:
        order = torch.arange(n, device=run.splits.x_train.device)
    return order[: min(n, len(batches) * batches.batch_size)]


def _copy_back(params: list[Tensor], per_run: list[list[Tensor]]) -> None:
    """Each run's model gets its slice of the stacked weights, and of their last gradients (epoch hooks read
    both: the diagnostics plugin measures the gradient flow)."""
    with torch.no_grad():
        for i, stacked in enumerate(params):
            for j, own in enumerate(per_run):
                own[i].copy_(stacked[j])
                own[i].grad = None if stacked.grad is None else stacked.grad[j].clone()
