"""Models, activations and losses."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from optiflow import hookimpl
from optiflow.errors import OptiflowError
from optiflow.registry import Nested

#: an option naming a registered activation with its options: ``activation=[leaky-relu:negative_slope=0.1]``
Activation = Annotated[Nested, "activation"]

MAX_UNITS = 1_000_000  # units or channels in one layer


@hookimpl
def optiflow_register_models(register):
    register("linear", linear)
    register("mlp", mlp)
    register("cnn", cnn)
    register("lenet", lenet)
    for name, factory in ACTIVATIONS.items():
        register(name, factory, kind="activation")
    register("cross-entropy", cross_entropy, kind="loss", aliases=["ce"])
    register("mse", mse, kind="loss")


def linear(input_shape: tuple, num_outputs: int):
    """One linear layer on flattened inputs: linear/logistic/softmax regression."""
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_outputs))


def mlp(input_shape: tuple, num_outputs: int, *, hidden: tuple[int, ...] = (256,), activation: Activation = "relu",
        batch_norm: Literal["none", "before", "after"] = "none", dropout: float = 0.0):
    """Multi-layer perceptron on flattened inputs; batch norm before or after each activation, then dropout."""
    from torch import nn

    _check_dropout(dropout)
    _check_sizes("mlp", "hidden", hidden)
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for size in hidden:
        act = activation.build()
        layers.append(nn.Linear(width, size * getattr(act, "pieces", 1)))
        if batch_norm == "before":
            layers += [nn.BatchNorm1d(size * getattr(act, "pieces", 1)), act]
        elif batch_norm == "after":
            layers += [act, nn.BatchNorm1d(size)]
        else:
            layers.append(act)
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


def cnn(input_shape: tuple, num_outputs: int, *, channels: tuple[int, ...] = (32, 64),
        hidden: tuple[int, ...] = (600, 120), activation: Activation = "relu", batch_norm: bool = True,
        dropout: float = 0.25):
    """The two-conv FashionMNIST network: [conv-BN-act-maxpool] x2, dense layers with dropout; any image size."""
    from torch import nn

    _check_dropout(dropout)
    _check_sizes("cnn", "channels", channels)
    _check_sizes("cnn", "hidden", hidden)
    in_channels, height, width = _image_shape("cnn", input_shape)
    if len(channels) != 2:
        raise OptiflowError(f"cnn: channels takes two sizes (first and second conv), got {list(channels)}")
    features: list[nn.Module] = []
    for index, out_channels in enumerate(channels):
        act = activation.build()
        pieces = getattr(act, "pieces", 1)
        features.append(nn.Conv2d(in_channels, out_channels * pieces, 3, padding=1 if index == 0 else 0))
        if batch_norm:
            features.append(nn.BatchNorm2d(out_channels * pieces))
        features += [act, nn.MaxPool2d(2)]
        in_channels = out_channels
    return _conv_net("cnn", input_shape, features, hidden, activation, dropout, num_outputs, first_dropout_only=True)


def lenet(input_shape: tuple, num_outputs: int, *, activation: Activation = "tanh", pooling: Literal["avg", "max"] = "avg"):
    """LeNet-5 (LeCun et al. 1998): conv5-pool-conv5-pool, dense 120-84; inputs of at least 12x12."""
    from torch import nn

    in_channels, height, width = _image_shape("lenet", input_shape)
    if min(height, width) < 12:
        raise OptiflowError(f"lenet needs images of at least 12x12, got {height}x{width}; use cnn for smaller images")
    pool = nn.AvgPool2d if pooling == "avg" else nn.MaxPool2d
    first, second = activation.build(), activation.build()
    features = [
        nn.Conv2d(in_channels, 6 * getattr(first, "pieces", 1), 5, padding=2), first, pool(2),
        nn.Conv2d(6, 16 * getattr(second, "pieces", 1), 5), second, pool(2),
    ]
    return _conv_net("lenet", input_shape, features, (120, 84), activation, 0.0, num_outputs)


cnn.needs_images = True
lenet.needs_images = True


def _conv_net(name, input_shape, features, hidden, activation, dropout, num_outputs, first_dropout_only=False):
    """Convolutional ``features`` followed by dense layers sized by a dry run on one input."""
    import torch
    from torch import nn

    body = nn.Sequential(*features, nn.Flatten())
    with torch.no_grad():
        try:
            width = body.eval()(torch.zeros(1, *input_shape)).shape[1]
        except RuntimeError:
            raise OptiflowError(f"{name}: images of shape {list(input_shape)} are too small for its layers") from None
    body.train()
    layers = list(body)
    for index, size in enumerate(hidden):
        act = activation.build()
        layers += [nn.Linear(width, size * getattr(act, "pieces", 1)), act]
        if dropout and (index == 0 or not first_dropout_only):
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


def _image_shape(name: str, input_shape: tuple) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise OptiflowError(
            f"{name} needs images (channels x height x width), got inputs of shape {list(input_shape)}; "
            "use an image dataset (digits, mnist, cifar10, image-folder) and a normalizer that keeps the image shape"
        )
    return tuple(int(v) for v in input_shape)  # type: ignore[return-value]


def _check_sizes(name: str, option: str, sizes: tuple[int, ...]) -> None:
    """Layer sizes are whole numbers of units in [1, MAX_UNITS] (a negative size is no typo to fix by abs())."""
    for size in sizes:
        if not 1 <= size <= MAX_UNITS:
            raise OptiflowError(f"{name}: every size in '{option}' must be in [1, {MAX_UNITS}], got {size}")


def _check_dropout(rate: float) -> None:
    if not 0.0 <= rate < 1.0:
        raise OptiflowError(f"dropout must be in [0, 1), got {rate}")


def relu():
    """max(0, x)."""
    from torch import nn

    return nn.ReLU()


def leaky_relu(*, negative_slope: float = 0.01):
    """max(0, x) + negative_slope * min(0, x): keeps a small gradient for negative inputs."""
    from torch import nn

    return nn.LeakyReLU(negative_slope)


def elu(*, alpha: float = 1.0):
    """x for x > 0, alpha * (e^x - 1) otherwise (Clevert et al. 2015)."""
    from torch import nn

    return nn.ELU(alpha)


def gelu(*, approximate: Literal["none", "tanh"] = "none"):
    """x * Phi(x), the Gaussian error linear unit (Hendrycks & Gimpel 2016)."""
    from torch import nn

    return nn.GELU(approximate=approximate)


def selu():
    """Scaled ELU for self-normalizing networks (Klambauer et al. 2017)."""
    from torch import nn

    return nn.SELU()


def silu():
    """x * sigmoid(x), a.k.a. swish."""
    from torch import nn

    return nn.SiLU()


def tanh():
    """Hyperbolic tangent, zero-centred in (-1, 1)."""
    from torch import nn

    return nn.Tanh()


def sigmoid():
    """Logistic 1 / (1 + e^-x); saturates, so deep sigmoid nets show vanishing gradients."""
    from torch import nn

    return nn.Sigmoid()


def softplus(*, beta: float = 1.0):
    """log(1 + e^(beta x)) / beta, a smooth ReLU."""
    from torch import nn

    return nn.Softplus(beta=beta)


def identity():
    """No nonlinearity, f(x) = x: stacked linear layers stay one linear map."""
    from torch import nn

    return nn.Identity()


def maxout(*, pieces: int = 2):
    """Maxout (Goodfellow et al. 2013): the layer before it emits `pieces` units per output, maxout keeps the max."""
    if pieces < 2:
        raise OptiflowError(f"maxout needs at least 2 pieces, got {pieces}")
    from optiflow_plugins.layers import Maxout

    return Maxout(pieces)


ACTIVATIONS = {
    "relu": relu,
    "leaky-relu": leaky_relu,
    "elu": elu,
    "gelu": gelu,
    "selu": selu,
    "silu": silu,
    "tanh": tanh,
    "sigmoid": sigmoid,
    "softplus": softplus,
    "identity": identity,
    "maxout": maxout,
}


def cross_entropy(task: str, *, label_smoothing: float = 0.0):
    """Softmax cross-entropy on logits (the softmax is inside the loss, never in the model)."""
    from torch import nn

    if task != "classification":
        raise OptiflowError("the cross-entropy loss needs a classification dataset")
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def mse(task: str):
    """Mean squared error; on classification data the quadratic cost between softmax outputs and one-hot targets."""
    from optiflow_plugins.layers import MSE, SoftmaxMSE

    return SoftmaxMSE() if task == "classification" else MSE()
