"""Every optimizer in torch.optim, with weight decay kept off biases and normalization parameters by default.

``decay_bias=true`` puts every parameter in the decayed group.  The loop steps an optimizer that may
re-evaluate the loss (LBFGS, any subclass or third-party optimizer) with ``optimizer.step(closure)``,
so its repeated evaluations work; PyTorch's first-order ones (SGD, Adam ...: ``optiflow.optim.first_order``)
and any optimizer under fp16's GradScaler are stepped after one evaluation, without a closure.
"""

from __future__ import annotations

from typing import Literal

from optiflow import hookimpl
from optiflow.errors import OptiflowError
from optiflow.optim import decay_params


@hookimpl
def optiflow_register_optimizers(register):
    for name, factory in OPTIMIZERS.items():
        register(name, factory)


def sgd(model, *, lr: float = 0.01, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
        weight_decay: float = 0.0, decay_bias: bool = False):
    """Stochastic gradient descent (plain by default; momentum and Nesterov as options)."""
    import torch

    if nesterov and momentum <= 0:
        raise OptiflowError("sgd: nesterov=true needs momentum > 0 (or use the 'nesterov' optimizer)")
    return torch.optim.SGD(decay_params(model, decay_bias, weight_decay), lr=lr, momentum=momentum, dampening=dampening,
                           nesterov=nesterov, weight_decay=weight_decay)


def momentum(model, *, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0, decay_bias: bool = False):
    """SGD with classical (heavy-ball) momentum."""
    return sgd(model, lr=lr, momentum=momentum, weight_decay=weight_decay, decay_bias=decay_bias)


def nesterov(model, *, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0, decay_bias: bool = False):
    """SGD with Nesterov accelerated momentum (Sutskever et al. 2013)."""
    return sgd(model, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay, decay_bias=decay_bias)


def adagrad(model, *, lr: float = 0.01, lr_decay: float = 0.0, initial_accumulator_value: float = 0.0,
            eps: float = 1e-10, weight_decay: float = 0.0, decay_bias: bool = False):
    """Adagrad: per-parameter rates scaled by accumulated squared gradients (Duchi et al. 2011)."""
    import torch

    return torch.optim.Adagrad(decay_params(model, decay_bias, weight_decay), lr=lr, lr_decay=lr_decay, eps=eps,
                               initial_accumulator_value=initial_accumulator_value, weight_decay=weight_decay)


def rmsprop(model, *, lr: float = 0.001, alpha: float = 0.99, eps: float = 1e-8, momentum: float = 0.0,
            centered: bool = False, weight_decay: float = 0.0, decay_bias: bool = False):
    """RMSprop: rates scaled by a moving average of squared gradients (centered: by their variance)."""
    import torch

    return torch.optim.RMSprop(decay_params(model, decay_bias, weight_decay), lr=lr, alpha=alpha, eps=eps, momentum=momentum,
                               centered=centered, weight_decay=weight_decay)


def adadelta(model, *, lr: float = 1.0, rho: float = 0.9, eps: float = 1e-6, weight_decay: float = 0.0,
             decay_bias: bool = False):
    """Adadelta: Adagrad without a global learning rate to tune (Zeiler 2012)."""
    import torch

    return torch.optim.Adadelta(decay_params(model, decay_bias, weight_decay), lr=lr, rho=rho, eps=eps, weight_decay=weight_decay)


def adam(model, *, lr: float = 1e-3, betas: tuple[float, ...] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: float = 0.0, amsgrad: bool = False, decay_bias: bool = False):
    """Adam: adaptive moment estimation (Kingma & Ba 2014)."""
    import torch

    return torch.optim.Adam(decay_params(model, decay_bias, weight_decay), lr=lr, betas=_pair("betas", betas), eps=eps,
                            weight_decay=weight_decay, amsgrad=amsgrad)


def amsgrad(model, *, lr: float = 1e-3, betas: tuple[float, ...] = (0.9, 0.999), eps: float = 1e-8,
            weight_decay: float = 0.0, decay_bias: bool = False):
    """AMSGrad: Adam with a non-decreasing second-moment estimate (Reddi et al. 2018)."""
    return adam(model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=True, decay_bias=decay_bias)


def adamax(model, *, lr: float = 2e-3, betas: tuple[float, ...] = (0.9, 0.999), eps: float = 1e-8,
           weight_decay: float = 0.0, decay_bias: bool = False):
    """Adamax: Adam with the infinity norm of past gradients."""
    import torch

    return torch.optim.Adamax(decay_params(model, decay_bias, weight_decay), lr=lr, betas=_pair("betas", betas), eps=eps,
                              weight_decay=weight_decay)


def adamw(model, *, lr: float = 1e-3, betas: tuple[float, ...] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.01, amsgrad: bool = False, decay_bias: bool = False):
    """AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2019)."""
    import torch

    return torch.optim.AdamW(decay_params(model, decay_bias, weight_decay), lr=lr, betas=_pair("betas", betas), eps=eps,
                             weight_decay=weight_decay, amsgrad=amsgrad)


def nadam(model, *, lr: float = 2e-3, betas: tuple[float, ...] = (0.9, 0.999), eps: float = 1e-8,
          momentum_decay: float = 4e-3, weight_decay: float = 0.0, decay_bias: bool = False):
    """NAdam: Adam with Nesterov momentum (Dozat 2016)."""
    import torch

    return torch.optim.NAdam(decay_params(model, decay_bias, weight_decay), lr=lr, betas=_pair("betas", betas), eps=eps,
                             momentum_decay=momentum_decay, weight_decay=weight_decay)


def radam(model, *, lr: float = 1e-3, betas: tuple[float, ...] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.0, decay_bias: bool = False):
    """RAdam: Adam with a rectified adaptive rate during warm-up (Liu et al. 2020)."""
    import torch

    return torch.optim.RAdam(decay_params(model, decay_bias, weight_decay), lr=lr, betas=_pair("betas", betas), eps=eps,
                             weight_decay=weight_decay)


def asgd(model, *, lr: float = 0.01, lambd: float = 1e-4, alpha: float = 0.75, t0: float = 1e6,
         weight_decay: float = 0.0, decay_bias: bool = False):
    """Averaged SGD (Polyak & Juditsky 1992)."""
    import torch

    return torch.optim.ASGD(decay_params(model, decay_bias, weight_decay), lr=lr, lambd=lambd, alpha=alpha, t0=t0,
                            weight_decay=weight_decay)


def rprop(model, *, lr: float = 0.01, etas: tuple[float, ...] = (0.5, 1.2),
          step_sizes: tuple[float, ...] = (1e-6, 50.0)):
    """Rprop: sign-based steps with per-weight adaptive sizes; meant for full-batch training."""
    import torch

    return torch.optim.Rprop(model.parameters(), lr=lr, etas=_pair("etas", etas), step_sizes=_pair("step_sizes", step_sizes))


def lbfgs(model, *, lr: float = 1.0, max_iter: int = 20, history_size: int = 100,
          line_search: Literal["strong-wolfe", "none"] = "strong-wolfe"):
    """L-BFGS quasi-Newton steps (several loss evaluations per step); best with --batch-size full."""
    import torch

    for name, value in (("max_iter", max_iter), ("history_size", history_size)):
        if value < 1:
            raise OptiflowError(f"lbfgs: {name} must be >= 1, got {value}")

    return torch.optim.LBFGS(model.parameters(), lr=lr, max_iter=max_iter, history_size=history_size,
                             line_search_fn="strong_wolfe" if line_search == "strong-wolfe" else None)


def sparse_adam(model, *, lr: float = 1e-3, betas: tuple[float, ...] = (0.9, 0.999), eps: float = 1e-8):
    """Lazy Adam for sparse gradients (models with nn.Embedding(sparse=True)) only."""
    import torch
    from torch import nn

    sparse = [m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    if not sparse:
        raise OptiflowError(
            "sparse-adam needs sparse gradients (nn.Embedding(sparse=True)); this model's gradients are dense: use adam"
        )
    dense = [p for p in model.parameters() if all(p is not s.weight for s in sparse)]
    if dense:
        raise OptiflowError(
            f"sparse-adam only updates sparse embeddings, but this model also has {len(dense)} dense parameter "
            "tensor(s): use adam"
        )
    return torch.optim.SparseAdam(list(model.parameters()), lr=lr, betas=_pair("betas", betas), eps=eps)


def adafactor(model, *, lr: float = 1e-2, beta2_decay: float = -0.8, eps: float = 1e-3, weight_decay: float = 0.0,
              decay_bias: bool = False):
    """Adafactor: factored second moments, sub-linear memory (Shazeer & Stern 2018)."""
    import torch

    return torch.optim.Adafactor(decay_params(model, decay_bias, weight_decay), lr=lr, beta2_decay=beta2_decay,
                                 eps=(None, eps), weight_decay=weight_decay)


def _pair(name: str, values: tuple[float, ...]) -> tuple[float, float]:
    if len(values) != 2:
        raise OptiflowError(f"option '{name}' takes two numbers, e.g. {name}=[0.9,0.999]; got {list(values)}")
    return float(values[0]), float(values[1])


OPTIMIZERS = {
    "sgd": sgd,
    "momentum": momentum,
    "nesterov": nesterov,
    "adagrad": adagrad,
    "rmsprop": rmsprop,
    "adadelta": adadelta,
    "adam": adam,
    "amsgrad": amsgrad,
    "adamax": adamax,
    "adamw": adamw,
    "nadam": nadam,
    "radam": radam,
    "asgd": asgd,
    "rprop": rprop,
    "lbfgs": lbfgs,
    "sparse-adam": sparse_adam,
    "adafactor": adafactor,
}
