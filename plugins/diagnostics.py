"""Training diagnostics for every run: per-layer gradient norms each epoch and a gradient-flow plot
(on runs that log artifacts: not on search's child runs unless --child-artifacts).

The norms are read at the end of each epoch from the gradients the last
training batch left in ``param.grad`` (as the optimizer used them, after any
clipping or noise), so the training step itself pays nothing: one on-device
norm per layer and one host transfer per epoch.  Each run's measurements live in
``run.state["diagnostics"]``, so concurrent runs never share them.  Layers are
named after their modules (``fc1``, ``features.conv2``), see :func:`layer_names`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from optiflow import hookimpl

METRIC_PREFIX = "grad_norm/"
STATE_KEY = "diagnostics"
SHORT_KINDS = {"Linear": "fc", "Conv1d": "conv", "Conv2d": "conv", "Conv3d": "conv", "BatchNorm1d": "bn",
               "BatchNorm2d": "bn", "BatchNorm3d": "bn", "LayerNorm": "ln"}


def layer_names(model) -> dict[str, str]:
    """A readable name per module, by qualified name: a position in a container (``3``, ``features.0``) becomes
    the module's kind and rank among its siblings of that kind (``fc2``, ``features.conv1``); named modules keep
    their names.  Only the metric names change: the parameters (and checkpoints) keep their keys."""
    names = {"": "model"}
    for parent_name, parent in model.named_modules():
        children = dict(parent.named_children())
        ranks: Counter[str] = Counter()
        for child_name, child in children.items():
            shown = child_name
            if child_name.isdigit():
                kind = SHORT_KINDS.get(type(child).__name__, type(child).__name__.lower())
                ranks[kind] += 1
                shown = f"{kind}{ranks[kind]}" if f"{kind}{ranks[kind]}" not in children else child_name
            qualified = f"{parent_name}.{child_name}" if parent_name else child_name
            names[qualified] = f"{names[parent_name]}.{shown}" if parent_name else shown
    return names


class GradientFlow:
    """Per-layer gradient norms of one run, one row per epoch."""

    def __init__(self) -> None:
        self.layers: list[str] = []
        self.epochs: list[int] = []
        self.norms: list[list[float]] = []

    def measure(self, model) -> dict[str, float]:
        """The L2 norm of each layer's current gradients, by layer name (layers without gradients skipped)."""
        import torch

        shown = layer_names(model)
        names, grads, owners = [], [], []
        for name, module in model.named_modules():
            own = [p.grad for p in module.parameters(recurse=False) if p.grad is not None and not p.grad.is_sparse]
            if own:
                names.append(shown[name])
                owners.append(len(own))
                grads += own
        if not grads:
            return {}
        squares = torch.stack(torch._foreach_norm(grads)).float().pow(2)
        per_layer = torch.stack([chunk.sum() for chunk in squares.split(owners)]).sqrt().tolist()
        return dict(zip(names, per_layer))

    def record(self, epoch: int, norms: dict[str, float]) -> None:
        if not self.layers:
            self.layers = list(norms)
        self.epochs.append(epoch)
        self.norms.append([norms.get(layer, float("nan")) for layer in self.layers])

    def figure(self, model=None) -> Any:
        """Gradient norm per layer (input to output, log scale), one line per epoch from dark to light."""
        return flow_figure(**self.drawn(model))

    def drawn(self, model=None) -> dict[str, Any]:
        """What :func:`flow_figure` draws (JSON values): the norms, and each layer's kind where ``model`` says it."""
        shown = layer_names(model) if model is not None else {}
        kinds = {shown[name]: type(module).__name__ for name, module in model.named_modules()} if shown else {}
        labels = [f"{layer}\n{kinds[layer]}" if layer in kinds else layer for layer in self.layers]
        return {"labels": labels, "epochs": self.epochs, "norms": self.norms}


def flow_figure(labels: list[str], epochs: list[int], norms: list[list[float]]) -> Any:
    """The gradient-flow figure of :meth:`GradientFlow.figure` from its JSON values (drawn beside the run)."""
    from optiflow.plots import pyplot

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(max(5.5, 0.6 * len(labels)), 4))
    colors = plt.get_cmap("viridis")
    for index, (epoch, row) in enumerate(zip(epochs, norms)):
        shade = colors(index / max(1, len(epochs) - 1))
        axis.plot(range(len(labels)), row, marker=".", color=shade, label=f"epoch {epoch}")
    axis.set_xticks(range(len(labels)), labels, fontsize=7)
    axis.set_yscale("log")
    axis.set(xlabel="layer (input → output)", ylabel="gradient L2 norm", title="gradient flow")
    if len(epochs) <= 12:
        axis.legend(fontsize=7, title="one line per epoch", title_fontsize=7)
    else:  # too many lines to name: the colour scale says which epoch each is
        scale = plt.cm.ScalarMappable(cmap=colors, norm=plt.Normalize(epochs[0], epochs[-1]))
        figure.colorbar(scale, ax=axis, label="epoch")
    figure.subplots_adjust(left=0.12, right=0.97, bottom=0.2, top=0.9)
    return figure


@hookimpl
def optiflow_epoch_metric_names(run):
    shown = layer_names(run.model)
    return [f"{METRIC_PREFIX}{shown[name]}" for name, module in run.model.named_modules()
            if any(p.requires_grad for p in module.parameters(recurse=False))]


@hookimpl
def optiflow_run_start(run):
    run.state[STATE_KEY] = GradientFlow()


@hookimpl
def optiflow_epoch_end(run, epoch, metrics):
    flow = run.state.get(STATE_KEY)
    if flow is None:
        return
    norms = flow.measure(run.model)
    if norms:
        flow.record(epoch, norms)
        metrics.update({f"{METRIC_PREFIX}{layer}": value for layer, value in norms.items()})


@hookimpl
def optiflow_run_end(run, status):
    flow = run.state.pop(STATE_KEY, None)
    if flow is None or not flow.epochs or run.tracker is None or not run.wants_artifacts:
        return
    from optiflow.drawing import Recipe

    run.tracker.log_figure(Recipe(f"{__name__}:flow_figure", flow.drawn(run.model)), "gradient_flow.png")
