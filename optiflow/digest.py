"""Fingerprints that prove a reproduction: SHA-256 of a model's weights and of a run's data, bit for bit.

Each tensor is hashed with its name, dtype and shape, so a reshaped or retyped tensor never hashes alike.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import torch
from torch import Tensor, nn

WEIGHTS_TAG = "optiflow.weights_sha256"
DATA_TAG = "optiflow.data_sha256"
#: bytes hashed per copy from the device, so a large split is never copied to the host whole
CHUNK = 1 << 26


def weights_digest(model: nn.Module | dict[str, Tensor]) -> str:
    """SHA-256 of every parameter and buffer in ``model``'s state dict, in its order."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    return tensors_digest(state.items())


def tensors_digest(named: Iterable[tuple[str, Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, tensor in named:
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        flat = tensor.reshape(-1)
        if flat.dtype == torch.bfloat16:  # numpy has no bfloat16: hash its bits
            flat = flat.view(torch.int16)
        step = max(1, CHUNK // max(flat.element_size(), 1))
        for start in range(0, flat.numel(), step):
            digest.update(flat[start:start + step].cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def source_digest(source: object) -> str:
    """SHA-256 of a dataset as its plugin gave it (a :class:`~optiflow.data.DataSource`): its arrays and what it
    says of them (task, classes, names, scales), never its name or where its files are."""
    described = {name: getattr(source, name) for name in ("task", "num_classes", "classes", "image", "feature_names",
                                                          "target", "target_scale", "raw_scale")}
    arrays = [(name, getattr(source, name)) for name in ("x", "y", "x_test", "y_test")]
    tensors = tensors_digest((name, tensor) for name, tensor in arrays if tensor is not None)
    return hashlib.sha256(f"{tensors}|{json.dumps(described, sort_keys=True, default=repr)}".encode()).hexdigest()


def largest_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> tuple[str | None, float]:
    """The name of the tensor whose elements differ most between ``a`` and ``b``, and by how much
    (``inf`` for a tensor one lacks or shaped otherwise)."""
    worst: tuple[str | None, float] = (None, 0.0)
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b or a[name].shape != b[name].shape:
            return name, float("inf")
        x, y = a[name].detach().cpu().double(), b[name].detach().cpu().double()
        difference = float((x - y).abs().max()) if x.numel() else 0.0
        if difference > worst[1] or worst[0] is None:
            worst = (name, difference)
    return worst
