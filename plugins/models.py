"""Models, activations and losses."""

from __future__ import annotations

import math

from optiflow import hookimpl


@hookimpl
def optiflow_register_models(register):
    register("mlp", mlp)
    for name, (factory, description) in ACTIVATIONS.items():
        register(name, factory, description, kind="activation")
    register("cross-entropy", cross_entropy, kind="loss", aliases=["ce"])
    register("mse", mse, kind="loss")


def mlp(input_shape: tuple, num_outputs: int, *, hidden: tuple[int, ...] = (256,), activation: str = "relu",
        dropout: float = 0.0):
    """Multi-layer perceptron on flattened inputs: Linear -> activation (-> dropout) per hidden layer."""
    from torch import nn

    from optiflow.plugins import get_registry

    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    make_activation = get_registry().get("activation", activation)
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for size in hidden:
        layers += [nn.Linear(width, size), make_activation.build()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


def _activation(class_name: str, description: str):
    def factory():
        from torch import nn

        return getattr(nn, class_name)()

    factory.__name__ = class_name.lower()
    return factory, description


ACTIVATIONS = {
    "relu": _activation("ReLU", "max(0, x)"),
    "tanh": _activation("Tanh", "hyperbolic tangent"),
    "sigmoid": _activation("Sigmoid", "logistic 1 / (1 + e^-x)"),
    "identity": _activation("Identity", "no nonlinearity, f(x) = x: stacked linear layers stay one linear map"),
}


def cross_entropy(task: str, *, label_smoothing: float = 0.0):
    """Softmax cross-entropy on logits (the softmax is inside the loss, never in the model)."""
    from torch import nn

    if task != "classification":
        raise ValueError("cross-entropy needs a classification dataset")
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def mse(task: str):
    """Mean squared error for regression."""
    from torch import nn

    class MSE(nn.MSELoss):
        def forward(self, outputs, targets):
            return super().forward(outputs.reshape(targets.shape), targets)

    return MSE()
