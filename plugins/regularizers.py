"""Regularizers: objects registered as plugins for one run, acting through lifecycle hooks.

Each logs its own effect as an epoch metric or tag: the penalty value, the
weight norm, the noise level, the clip count, the stopped and restored epoch.
"""

from __future__ import annotations

import math
from typing import Literal

from optiflow import hookimpl
from optiflow.errors import OptiflowError
from optiflow.metrics import check_monitor, higher_is_better


@hookimpl
def optiflow_register_regularizers(register):
    register("l1", L1Penalty)
    register("l2", L2Penalty)
    register("weight-decay", WeightDecay)
    register("dropout", Dropout)
    register("early-stopping", EarlyStopping)
    register("gradient-noise", GradientNoise)
    register("grad-clip", GradClip)
    register("label-smoothing", LabelSmoothing)


def weights(model):
    """The parameters penalties apply to: weight matrices and kernels, not biases or norm scales."""
    from torch import nn

    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    for module in model.modules():
        if isinstance(module, norm_types):
            continue
        for name, param in module.named_parameters(recurse=False):
            if name == "weight" and param.ndim > 1:
                yield param


def _check_range(owner: str, name: str, value: float, low: float, high: float | None = None) -> None:
    if value < low or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise OptiflowError(f"regularizer '{owner}': {name} must be {bound}, got {value}")


class _NormPenalty:
    """strength * sum(|w|^power) over weights, added to the loss of every batch."""

    name, power = "l2", 2

    def __init__(self, *, strength: float = 1e-4) -> None:
        _check_range(self.name, "strength", strength, 0.0)
        self.strength = strength

    def value(self, model):
        if self.power == 1:
            return self.strength * sum(p.abs().sum() for p in weights(model))
        return self.strength * sum(p.pow(2).sum() for p in weights(model))

    @hookimpl
    def optiflow_penalty(self, run):
        return self.value(run.model)

    @hookimpl
    def optiflow_epoch_metric_names(self, run):
        return [f"penalty_{self.name}"]

    @hookimpl
    def optiflow_epoch_end(self, run, epoch, metrics):
        import torch

        with torch.no_grad():
            metrics[f"penalty_{self.name}"] = float(self.value(run.model))


class L1Penalty(_NormPenalty):
    """Adds strength * sum(|w|) over weights (not biases) to the loss: drives weights to exactly zero."""

    name, power = "l1", 1


class L2Penalty(_NormPenalty):
    """Adds strength * sum(w^2) over weights (not biases) to the loss."""

    name, power = "l2", 2


class WeightDecay:
    """Sets the optimizer's weight decay on the weight groups (biases/norm too with decay_bias); logs the weight norm."""

    #: the core keeps weights and biases in separate optimizer groups for a run with this regularizer
    sets_weight_decay = True

    def __init__(self, *, strength: float = 5e-4, decay_bias: bool = False) -> None:
        _check_range("weight-decay", "strength", strength, 0.0)
        self.strength, self.decay_bias = strength, decay_bias

    @hookimpl
    def optiflow_check_run(self, run):
        if "weight_decay" not in run.optimizer.defaults:
            raise OptiflowError(
                f"optimizer '{run.plan.opt[0].name}' has no weight decay; use --reg l2 to penalize weights instead"
            )

    @hookimpl
    def optiflow_run_start(self, run):
        decayed = {id(p) for p in weights(run.model)}
        for group in run.optimizer.param_groups:
            if self.decay_bias or any(id(p) in decayed for p in group["params"]):
                group["weight_decay"] = self.strength

    @hookimpl
    def optiflow_epoch_metric_names(self, run):
        return ["weight_norm"]

    @hookimpl
    def optiflow_epoch_end(self, run, epoch, metrics):
        import torch

        with torch.no_grad():
            metrics["weight_norm"] = math.sqrt(sum(float(p.pow(2).sum()) for p in weights(run.model)))


class Dropout:
    """Dropout on the inputs of every Linear layer after the first (input_p: on the network's input) while training."""

    def __init__(self, *, p: float = 0.5, input_p: float = 0.0) -> None:
        _check_range("dropout", "p", p, 0.0, 1.0)
        _check_range("dropout", "input_p", input_p, 0.0, 1.0)
        self.p, self.input_p = p, input_p
        self.handles: list = []

    @staticmethod
    def _layers(model) -> list:
        from torch import nn

        return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]

    @hookimpl
    def optiflow_check_run(self, run):
        if not self._layers(run.model):
            raise OptiflowError("regularizer 'dropout' found no Linear or Conv layer in the model")

    @hookimpl
    def optiflow_run_start(self, run):
        from torch import nn

        layers = self._layers(run.model)
        if self.input_p:
            self.handles.append(layers[0].register_forward_pre_hook(self._drop_input))
        hidden = [m for m in layers[1:] if isinstance(m, nn.Linear)]
        self.handles += [layer.register_forward_pre_hook(self._drop_hidden) for layer in hidden]
        run.set_tags({"dropout.layers": len(hidden), "dropout.p": self.p, "dropout.input_p": self.input_p})

    def _drop_hidden(self, module, inputs):
        return self._drop(module, inputs, self.p)

    def _drop_input(self, module, inputs):
        return self._drop(module, inputs, self.input_p)

    @staticmethod
    def _drop(module, inputs, p):
        from torch.nn import functional

        return (functional.dropout(inputs[0], p, training=module.training), *inputs[1:])

    @hookimpl
    def optiflow_run_end(self, run, status):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class EarlyStopping:
    """Stop when the monitored metric has not improved by min_delta for patience epochs; restore the best weights."""

    def __init__(self, *, monitor: str = "val_loss", mode: Literal["auto", "min", "max"] = "auto",
                 patience: int = 5, min_delta: float = 0.0, restore_best: bool = True) -> None:
        _check_range("early-stopping", "patience", patience, 1)
        _check_range("early-stopping", "min_delta", min_delta, 0.0)
        self.monitor, self.patience, self.min_delta, self.restore_best = monitor, patience, min_delta, restore_best
        self.sign = -1.0 if (mode == "min" or (mode == "auto" and not higher_is_better(monitor))) else 1.0
        self.best: float | None = None
        self.best_epoch = 0
        self.wait = 0
        self.best_state: dict | None = None

    @hookimpl
    def optiflow_check_run(self, run):
        if run.metric_names is not None:
            check_monitor("early-stopping", self.monitor, run.metric_names, len(run.splits.x_val) > 0)

    @hookimpl
    def optiflow_epoch_metric_names(self, run):
        return ["early_stopping_wait"]

    @hookimpl
    def optiflow_epoch_end(self, run, epoch, metrics):
        value = metrics.get(self.monitor)
        if value is None:
            raise OptiflowError(
                f"early-stopping monitors '{self.monitor}', which this run does not log; "
                f"choose one of {', '.join(sorted(metrics))}"
            )
        improved = math.isfinite(value) and (self.best is None or self.sign * (value - self.best) > self.min_delta)
        if improved:
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best:
                self.best_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        else:
            self.wait += 1
            if self.wait >= self.patience:
                best = (f"best {self.best:.6g} at epoch {self.best_epoch}" if self.best is not None
                        else f"no finite {self.monitor} yet")
                run.request_stop(
                    f"early stopping: {self.monitor} did not improve for {self.patience} epochs ({best})"
                )
        metrics["early_stopping_wait"] = self.wait

    def state_dict(self) -> dict:
        """What ``--resume`` needs to go on counting where the interrupted run stopped."""
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait, "best_state": self.best_state}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], state["wait"]
        self.best_state = state["best_state"]

    @hookimpl
    def optiflow_run_end(self, run, status):
        if self.best is None:
            return
        tags = {"early_stopping.best_epoch": self.best_epoch, f"early_stopping.best_{self.monitor}": self.best}
        if self.restore_best and self.best_state is not None and status == "FINISHED":
            run.model.load_state_dict(self.best_state)
            tags["early_stopping.restored_epoch"] = self.best_epoch
        run.set_tags(tags)


class GradientNoise:
    """Adds N(0, sigma_t^2) to every gradient, sigma_t^2 = eta / (1 + t)^gamma at step t (Neelakantan et al. 2015)."""

    def __init__(self, *, eta: float = 0.01, gamma: float = 0.55) -> None:
        _check_range("gradient-noise", "eta", eta, 0.0)
        _check_range("gradient-noise", "gamma", gamma, 0.0)
        self.eta, self.gamma = eta, gamma

    def std(self, step: int) -> float:
        """The noise standard deviation at training step ``step`` (batches counted from 1)."""
        return math.sqrt(self.eta / (1 + step) ** self.gamma)

    @hookimpl
    def optiflow_after_backward(self, run, step):
        import torch

        grads = [p.grad for p in run.model.parameters() if p.grad is not None]
        if grads:
            sigma = self.std(step)
            torch._foreach_add_(grads, [torch.randn_like(g) for g in grads], alpha=sigma)

    @hookimpl
    def optiflow_epoch_metric_names(self, run):
        return ["grad_noise_std"]

    @hookimpl
    def optiflow_epoch_end(self, run, epoch, metrics):
        metrics["grad_noise_std"] = self.std(run.step)


class GradClip:
    """Clips gradients by their total norm (mode=norm) or elementwise (mode=value) at threshold; logs the clip count."""

    def __init__(self, *, mode: Literal["norm", "value"] = "norm", threshold: float = 1.0,
                 norm_type: float = 2.0) -> None:
        if threshold <= 0:
            raise OptiflowError(f"regularizer 'grad-clip': threshold must be > 0, got {threshold}")
        self.mode, self.threshold, self.norm_type = mode, threshold, norm_type
        self.clipped = None
        self.peak = None
        self.total = 0

    @hookimpl
    def optiflow_after_backward(self, run, step):
        import torch
        from torch.nn import utils

        params = [p for p in run.model.parameters() if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        if self.mode == "norm":
            size = utils.get_total_norm(grads, self.norm_type)
            utils.clip_grads_with_norm_(params, self.threshold, size)
        else:
            size = utils.get_total_norm(grads, math.inf)
            torch._foreach_clamp_min_(grads, -self.threshold)
            torch._foreach_clamp_max_(grads, self.threshold)
        over = (size > self.threshold).long()
        self.clipped = over if self.clipped is None else self.clipped + over
        self.peak = size.detach() if self.peak is None else torch.maximum(self.peak, size.detach())

    @hookimpl
    def optiflow_epoch_metric_names(self, run):
        return ["grad_clip_count", "grad_clip_norm_max" if self.mode == "norm" else "grad_clip_value_max"]

    @hookimpl
    def optiflow_epoch_end(self, run, epoch, metrics):
        clipped = int(self.clipped) if self.clipped is not None else 0
        self.total += clipped
        metrics["grad_clip_count"] = clipped
        metrics["grad_clip_norm_max" if self.mode == "norm" else "grad_clip_value_max"] = (
            float(self.peak) if self.peak is not None else 0.0
        )
        self.clipped = self.peak = None

    @hookimpl
    def optiflow_run_end(self, run, status):
        run.set_tags({"grad_clip.total_clipped_steps": self.total})


class LabelSmoothing:
    """Cross-entropy against targets smoothed to (1 - epsilon) on the true class and epsilon spread over all classes."""

    def __init__(self, *, epsilon: float = 0.1) -> None:
        _check_range("label-smoothing", "epsilon", epsilon, 0.0, 1.0)
        self.epsilon = epsilon

    @hookimpl
    def optiflow_check_run(self, run):
        from torch import nn

        if run.task != "classification" or not isinstance(run.loss_fn, nn.CrossEntropyLoss):
            raise OptiflowError("label-smoothing needs a classification run with the cross-entropy loss")

    @hookimpl
    def optiflow_run_start(self, run):
        run.loss_fn.label_smoothing = self.epsilon
        run.set_tags({"label_smoothing.epsilon": self.epsilon})
