"""Helpers optimizer plugins share."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

_KEEP_DECAY_GROUPS: contextvars.ContextVar[bool] = contextvars.ContextVar("keep_decay_groups", default=False)


@contextlib.contextmanager
def keep_decay_groups(keep: bool = True) -> Iterator[None]:
    """While open, :func:`decay_params` keeps weights and biases in separate groups even without
    weight decay: a regularizer that sets the decay later (``--reg weight-decay``) needs them apart."""
    token = _KEEP_DECAY_GROUPS.set(keep)
    try:
        yield
    finally:
        _KEEP_DECAY_GROUPS.reset(token)


def decay_params(model: nn.Module, include_bias_and_norm: bool = False,
                 weight_decay: float | None = None) -> list[dict[str, Any]]:
    """Parameter groups in which biases and normalization parameters get no weight decay.

    With ``include_bias_and_norm``, or a ``weight_decay`` of 0 (no decay to spare anyone from), every
    trainable parameter is in one group: one group is one fused/foreach kernel launch per step, not two.
    """
    from torch import nn

    if include_bias_and_norm or (weight_decay == 0 and not _KEEP_DECAY_GROUPS.get()):
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    decay, no_decay = [], []
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(module, norm_types) or param.ndim <= 1 or name.endswith("bias"):
                no_decay.append(param)
            else:
                decay.append(param)
    groups: list[dict[str, Any]] = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


#: PyTorch's first-order optimizers whose update is element-wise per parameter entry
FIRST_ORDER = ("SGD", "Adam", "AdamW", "Adamax", "Adagrad", "Adadelta", "RMSprop", "NAdam", "RAdam")


def first_order(optimizer: object) -> bool:
    """Whether ``optimizer`` is exactly one of torch.optim's :data:`FIRST_ORDER` classes (not a subclass): it
    evaluates a closure once, before updating, so stepping it without one is the same computation; and
    stepping parameters stacked ``[K, ...]`` steps each of the K as if alone."""
    import torch

    return type(optimizer) in tuple(getattr(torch.optim, name) for name in FIRST_ORDER)
