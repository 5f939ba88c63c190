"""The logged model's ``python_function`` flavor: ``mlflow.pyfunc.load_model(uri).predict(x)``.

Standalone on purpose (numpy, pandas, torch and mlflow only): every logged model carries a copy
of this file as ``code/optiflow_serving.py``, so it loads and serves (``mlflow models serve``)
where optiflow is not installed.  What ``predict`` takes and gives is described by the
``optiflow`` entry of the model's MLmodel metadata (see ``optiflow/export.py``).
"""

from __future__ import annotations

import math
import os
from typing import Any


def _load_pyfunc(path: str, model_config: Any = None) -> Predictor:
    """MLflow's loader hook: ``path`` is the model's ``data`` folder (the exported program)."""
    import mlflow.pytorch
    from mlflow.models import Model

    folder = os.path.dirname(os.path.abspath(path))
    card = (Model.load(folder).metadata or {})["optiflow"]
    return Predictor(mlflow.pytorch.load_model(folder), card)


class Predictor:
    """Raw rows in, a DataFrame out: one probability column per class (named by the class) for
    classification, ``prediction`` (``prediction_0..k-1``) in the target's units for regression."""

    def __init__(self, module: Any, card: dict[str, Any]) -> None:
        self.module = module
        self.card = card

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        import numpy as np
        import pandas as pd
        import torch

        x, index = self.inputs(data)
        with torch.no_grad():
            outputs = self.module(torch.from_numpy(x)).numpy().astype(np.float64).reshape(len(x), -1)
        return pd.DataFrame(outputs, columns=self.columns(outputs.shape[1]), index=index)

    def inputs(self, data: Any) -> tuple[Any, Any]:
        """``data`` as a contiguous float32 array shaped ``(N, *input_shape)``, and the row index to keep."""
        import numpy as np
        import pandas as pd

        shape = tuple(self.card["input_shape"])
        index = None
        if isinstance(data, pd.DataFrame):
            index = data.index
            names = self.card.get("feature_names")
            if names and set(names) <= set(data.columns):
                data = data[names]
            data = data.to_numpy(dtype=np.float32)
        x = np.require(data, np.float32, ["C", "W"])  # writable: pandas' copy-on-write views are read-only for torch
        if x.shape[1:] != shape and x.ndim == 2 and x.shape[1] == math.prod(shape):
            x = x.reshape(len(x), *shape)
        if x.shape[1:] != shape:
            raise ValueError(f"inputs of shape {list(x.shape)}; the model takes (N, {', '.join(map(str, shape))})")
        return x, index

    def columns(self, width: int) -> list[str]:
        if self.card["task"] == "classification":
            return [str(c) for c in self.card["classes"]]
        return ["prediction"] if width == 1 else [f"prediction_{i}" for i in range(width)]
