"""Weight initializers, applied by the core to every Linear and Conv layer; each sets biases to ``bias``.

``lsuv`` is data-aware: its callable says ``needs_batch = True`` and gets the whole model and
the training inputs once instead of one layer at a time.
"""

from __future__ import annotations

import warnings
from typing import Literal

from optiflow import hookimpl
from optiflow.errors import OptiflowError

Nonlinearity = Literal["relu", "leaky_relu", "tanh", "sigmoid", "selu", "linear"]
SYMMETRY_WARNING = (
    "initializer '{name}' gives every unit of a layer identical weights: their gradients stay identical "
    "and symmetry is never broken, so the layer behaves like a single unit"
)


@hookimpl
def optiflow_register_initializers(register):
    register("default", default)
    for name, factory in INITIALIZERS.items():
        register(name, factory)


def default():
    """Keep PyTorch's own initialization of each layer (Kaiming-uniform with a=sqrt(5))."""
    return None


def xavier_uniform(*, gain: float = 1.0, bias: float = 0.0):
    """Glorot/Xavier uniform: U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out))."""
    from torch import nn

    return _initializer(lambda w: nn.init.xavier_uniform_(w, gain=gain), bias)


def xavier_normal(*, gain: float = 1.0, bias: float = 0.0):
    """Glorot/Xavier normal: N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out))."""
    from torch import nn

    return _initializer(lambda w: nn.init.xavier_normal_(w, gain=gain), bias)


def kaiming_uniform(*, mode: Literal["fan_in", "fan_out"] = "fan_in", nonlinearity: Nonlinearity = "relu",
                    a: float = 0.0, bias: float = 0.0):
    """He/Kaiming uniform: U(-b, b), b = gain(nonlinearity) * sqrt(3 / fan_mode)."""
    from torch import nn

    return _initializer(lambda w: nn.init.kaiming_uniform_(w, a=a, mode=mode, nonlinearity=nonlinearity), bias)


def kaiming_normal(*, mode: Literal["fan_in", "fan_out"] = "fan_in", nonlinearity: Nonlinearity = "relu",
                   a: float = 0.0, bias: float = 0.0):
    """He/Kaiming normal: N(0, std^2), std = gain(nonlinearity) / sqrt(fan_mode)."""
    from torch import nn

    return _initializer(lambda w: nn.init.kaiming_normal_(w, a=a, mode=mode, nonlinearity=nonlinearity), bias)


def orthogonal(*, gain: float = 1.0, bias: float = 0.0):
    """(Semi-)orthogonal weight matrices scaled by gain (Saxe et al. 2014)."""
    from torch import nn

    return _initializer(lambda w: nn.init.orthogonal_(w, gain=gain), bias)


def normal(*, mean: float = 0.0, std: float = 0.01, bias: float = 0.0):
    """Weights drawn from N(mean, std^2)."""
    from torch import nn

    if std <= 0:
        raise OptiflowError(f"initializer 'normal': std must be > 0, got {std}")
    return _initializer(lambda w: nn.init.normal_(w, mean=mean, std=std), bias)


def uniform(*, low: float = -0.05, high: float = 0.05, bias: float = 0.0):
    """Weights drawn from U(low, high)."""
    from torch import nn

    if low >= high:
        raise OptiflowError(f"initializer 'uniform': low must be below high, got low={low}, high={high}")
    return _initializer(lambda w: nn.init.uniform_(w, a=low, b=high), bias)


def sparse(*, sparsity: float = 0.9, std: float = 0.01, bias: float = 0.0):
    """Each column keeps a (1 - sparsity) share of N(0, std^2) weights, the rest zero (Martens 2010)."""
    from torch import nn

    if not 0.0 <= sparsity < 1.0:
        raise OptiflowError(f"initializer 'sparse': sparsity must be in [0, 1), got {sparsity}")
    return _initializer(lambda w: nn.init.sparse_(w.view(w.shape[0], -1), sparsity=sparsity, std=std), bias)


def zeros(*, bias: float = 0.0):
    """All weights zero (a teaching example: symmetry is never broken)."""
    return _identical_weights("zeros", 0.0, bias)


def constant(*, value: float = 0.1, bias: float = 0.0):
    """All weights equal to value (a teaching example: symmetry is never broken)."""
    return _identical_weights("constant", value, bias)


def lsuv(*, batch: int = 256, tol: float = 0.05, max_iter: int = 10):
    """Layer-sequential unit variance: orthogonal weights, then each layer rescaled to unit output variance on a batch (Mishkin & Matas 2016)."""
    if batch < 2:
        raise OptiflowError(f"initializer 'lsuv': batch must be >= 2, got {batch}")
    if not 0.0 < tol < 1.0:
        raise OptiflowError(f"initializer 'lsuv': tol must be in (0, 1), got {tol}")
    if max_iter < 1:
        raise OptiflowError(f"initializer 'lsuv': max_iter must be >= 1, got {max_iter}")

    def apply(model, x) -> None:
        import torch
        from torch import nn

        layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
        sample = x[torch.randperm(len(x))[:batch]]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for layer in layers:
                nn.init.orthogonal_(layer.weight)
                if layer.bias is not None:
                    layer.bias.zero_()
            outputs: list = []
            for layer in layers:
                handle = layer.register_forward_hook(lambda module, inputs, output: outputs.append(output))
                try:
                    for _ in range(max_iter):
                        outputs.clear()
                        model(sample)
                        variance = float(outputs[0].var())
                        if abs(variance - 1.0) < tol or variance < 1e-12:
                            break
                        layer.weight.div_(variance ** 0.5)
                finally:
                    handle.remove()
        model.train(was_training)

    apply.needs_batch = True  # type: ignore[attr-defined]
    return apply


def _identical_weights(name: str, value: float, bias: float):
    from torch import nn

    warnings.warn(SYMMETRY_WARNING.format(name=name), UserWarning, stacklevel=3)
    return _initializer(lambda w: nn.init.constant_(w, value), bias)


def _initializer(init_weight, bias: float):
    """A callable that initializes one layer's weight with ``init_weight`` and its bias to ``bias``."""
    import torch

    def apply(layer) -> None:
        with torch.no_grad():
            init_weight(layer.weight)
            if getattr(layer, "bias", None) is not None:
                layer.bias.fill_(bias)

    return apply


INITIALIZERS = {
    "xavier-uniform": xavier_uniform,
    "xavier-normal": xavier_normal,
    "kaiming-uniform": kaiming_uniform,
    "kaiming-normal": kaiming_normal,
    "orthogonal": orthogonal,
    "normal": normal,
    "uniform": uniform,
    "sparse": sparse,
    "lsuv": lsuv,
    "zeros": zeros,
    "constant": constant,
}
