"""The K runs' plain MLP as one stacked model (:mod:`optiflow.stacked` trains it): its layers, the forward pass
over weights ``[K, ...]``, the K losses and the K validations computed at once on tensors ``[K, B, ...]``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from optiflow.metrics import hits

if TYPE_CHECKING:
    from optiflow.run import Run

#: element-wise activations: applied to ``[K, B, H]`` they act on each run's batch alone
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus,
               nn.Identity)

#: the K runs' losses on stacked outputs and targets
StackedLoss = Callable[[Tensor, Tensor], Tensor]
#: the same on batches padded to one length, ``valid`` ``[K, B]`` marking the real samples
MaskedLoss = Callable[[Tensor, Tensor, Tensor], Tensor]


def stacked_validation(runs: list[Run], layers: list[nn.Module]) -> Callable[[list[Tensor]], list[dict[str, float]]] | None:
    """For the plain cross-entropy on classes: ``validate(params)``, every run's ``val_loss`` and
    ``val_accuracy`` from one forward pass over the K validation splits (padded to one length), as
    ``loop.evaluate`` computes them run by run; None when a run has no validation split."""
    if any(not len(run.splits.x_val) or run.splits.y_val.ndim != 1 for run in runs):
        return None
    x_val, y_val = padded([run.splits.x_val for run in runs]), padded([run.splits.y_val for run in runs])
    sizes = torch.tensor([len(run.splits.x_val) for run in runs], device=x_val.device)
    valid = torch.arange(x_val.shape[1], device=x_val.device) < sizes[:, None]

    def validate(params: list[Tensor]) -> list[dict[str, float]]:
        with torch.no_grad():
            outputs = forward(layers, params, x_val)
            per_sample = torch.nn.functional.cross_entropy(outputs.flatten(0, 1), y_val.flatten(),
                                                           reduction="none").view(y_val.shape)
            losses = ((per_sample * valid).sum(1) / sizes).tolist()
            correct = (hits(outputs, y_val) & valid).sum(1).tolist()
        return [{"val_loss": loss, "val_accuracy": right / int(n)} for loss, right, n in zip(losses, correct, sizes)]

    return validate


def add_plain(sums: Tensor, plain: StackedLoss, outputs: list[Tensor], targets: list[Tensor],
               counts: list[int]) -> None:
    """Add each run's plain task loss on its real samples of this batch (``counts[j]`` of them) to ``sums[j]``."""
    with torch.no_grad():
        for j, count in enumerate(counts):
            if count:
                sums[j] += plain(outputs[j][:count].float(), targets[j][:count]) * count


def padded(tensors: list[Tensor]) -> Tensor:
    """``[K, max length, ...]``: the tensors stacked, the shorter ones padded with zeros at the end."""
    longest = max(len(t) for t in tensors)
    out = tensors[0].new_zeros((len(tensors), longest, *tensors[0].shape[1:]))
    for index, tensor in enumerate(tensors):
        out[index, : len(tensor)] = tensor
    return out


def _cross_entropy(run: Run) -> nn.CrossEntropyLoss | None:
    """The run's loss when it is PyTorch's plain cross-entropy (no class weights, mean, default ignore index)."""
    f = run.loss_fn
    if type(f) is nn.CrossEntropyLoss and f.weight is None and f.reduction == "mean" and f.ignore_index == -100:
        return f
    return None


def stacked_loss(runs: list[Run]) -> tuple[StackedLoss, MaskedLoss | None]:
    """The K runs' losses on outputs ``[K, B, C]`` and targets ``[K, B, ...]``: one cross-entropy over all K
    batches when every run's loss is PyTorch's plain one (per-sample losses, averaged per run), else each
    run's own loss function on its slice.  Second, for the plain one only, the same on batches padded to
    one length (``valid`` ``[K, B]`` marks the real samples; padding gets no weight and no gradient)."""
    functions = [run.loss_fn for run in runs]

    def each(outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.stack([f(outputs[j], targets[j]) for j, f in enumerate(functions)])

    plain = [_cross_entropy(run) for run in runs]
    smoothings = {f.label_smoothing if f is not None else None for f in plain}
    if len(smoothings) != 1 or None in smoothings:
        return each, None
    smoothing = float(smoothings.pop() or 0.0)

    def per_sample(outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(outputs.flatten(0, 1), targets.flatten(), reduction="none",
                                                 label_smoothing=smoothing).view(targets.shape)

    def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
        return each(outputs, targets) if targets.ndim != 2 else per_sample(outputs, targets).mean(1)

    def masked(outputs: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
        return (per_sample(outputs, targets) * valid).sum(1) / valid.sum(1)

    return cross_entropy, masked


def forward(layers: list[nn.Module], params: list[Tensor], x: Tensor) -> Tensor:
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


def mlp_layers(model: nn.Module) -> list[nn.Module] | None:
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


def layer_params(model: nn.Module) -> list[Tensor]:
    return [p for layer in model.children() if isinstance(layer, nn.Linear)
            for p in (layer.weight, layer.bias) if p is not None]


def signature(model: nn.Module) -> list[tuple[str, str]]:
    return [(type(layer).__name__, repr(layer)) for layer in model] if isinstance(model, nn.Sequential) else []
