"""How much of the data one computation holds at a time: evaluation batches sized by memory, and the
finiteness check of a dataset done a few MB at a time (issue 24: whole-set temporaries of 60,000 images
were hundreds of MB each)."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import Tensor

#: the most samples in one evaluation batch
EVALUATION_BATCH = 4096
#: what one evaluation batch may take in activations: the largest layer's input and output together
EVALUATION_BYTES = 64 << 20


def evaluation_batches(x: Tensor, y: Tensor, batch_size: int = EVALUATION_BATCH) -> Iterator[tuple[Tensor, Tensor]]:
    """Fixed-order batches for evaluation (no shuffling, no augmentation)."""
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


def evaluation_batch_size(model: torch.nn.Module, x: Tensor, budget: int = EVALUATION_BYTES) -> int:
    """Samples per evaluation batch of ``x`` through ``model``: as many as keep the largest layer's input
    plus output within ``budget`` bytes, at most ``EVALUATION_BATCH`` (a small model's whole split in one
    batch, as before).  A conv net on 60,000 28x28 images evaluated in 4,096-image batches held ~400 MB in
    its first activation alone; sized by memory, a batch's activations stay under ``budget``.

    Measured once per model and sample shape by a no-grad forward pass of two samples, in eval mode."""
    import torch

    if len(x) == 0:
        return EVALUATION_BATCH
    key = (tuple(x.shape[1:]), x.dtype, x.device, budget)
    sizes = _EVALUATION_SIZES.setdefault(model, {})
    if key not in sizes:
        probe = x[:2]
        largest = [probe.nbytes]

        def measure(module: torch.nn.Module, inputs: tuple[object, ...], output: object) -> None:
            largest.append(_nbytes(inputs) + _nbytes(output))

        leaves = [module for module in model.modules() if not any(True for _ in module.children())]
        hooks = [module.register_forward_hook(measure) for module in leaves]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(probe)
        finally:
            model.train(was_training)
            for hook in hooks:
                hook.remove()
        sizes[key] = max(1, min(EVALUATION_BATCH, budget * len(probe) // max(largest)))
    return sizes[key]


_EVALUATION_SIZES: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], int]] = weakref.WeakKeyDictionary()


def _nbytes(value: object) -> int:
    """Bytes of the tensors in ``value`` (a tensor, or tuples and lists of them)."""
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(item) for item in value)
    return int(value.nbytes) if hasattr(value, "nbytes") and hasattr(value, "element_size") else 0


#: values checked for finiteness at a time (a whole-set mask of 60,000 images took hundreds of MB)
FINITE_CHECK_VALUES = 1 << 22


def first_non_finite(flat: Tensor) -> tuple[int, int] | None:
    """(sample, column) of the first NaN or infinity in ``flat`` (samples x columns), or None; checked a few
    MB at a time."""
    import torch

    step = max(1, FINITE_CHECK_VALUES // max(1, flat.shape[1]))
    for start in range(0, len(flat), step):
        bad = (~torch.isfinite(flat[start : start + step])).nonzero()
        if len(bad):
            return start + int(bad[0][0]), int(bad[0][1])
    return None
