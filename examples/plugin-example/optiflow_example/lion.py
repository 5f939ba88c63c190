"""The Lion optimizer (EvoLved Sign Momentum), Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms", arXiv:2302.06675, Algorithm 2.

Per parameter, with gradient g, momentum m, learning rate lr and weight decay wd::

    update = sign(beta1 * m + (1 - beta1) * g)      # sign of the interpolated momentum
    theta  = theta - lr * (update + wd * theta)     # decoupled weight decay, as in AdamW
    m      = beta2 * m + (1 - beta2) * g            # the momentum tracks with a different beta

Every coordinate moves by exactly lr (plus decay), so Lion wants a learning rate 3-10x smaller
and a weight decay 3-10x larger than AdamW.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class Lion(torch.optim.Optimizer):
    """Sign momentum: one momentum buffer per parameter (half of Adam's memory)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"Lion needs lr > 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"Lion needs two betas in [0, 1), got {tuple(betas)}")
        if weight_decay < 0:
            raise ValueError(f"Lion needs weight_decay >= 0, got {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), weight_decay = group["lr"], group["betas"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                momentum = state["exp_avg"]
                if weight_decay:
                    param.mul_(1 - lr * weight_decay)
                update = momentum.mul(beta1).add_(param.grad, alpha=1 - beta1).sign_()
                param.add_(update, alpha=-lr)
                momentum.mul_(beta2).add_(param.grad, alpha=1 - beta2)
        return loss
