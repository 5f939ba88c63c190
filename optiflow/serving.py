"""The logged model's ``python_function`` flavor: ``mlflow.pyfunc.load_model(uri).predict(x)``.

Standalone on purpose (numpy, pandas, torch and mlflow only): every logged model carries a copy
of this file as ``code/optiflow_serving.py``, so it loads and serves (``mlflow models serve``)
where optiflow is not installed.  What ``predict`` takes and gives is described by the
``optiflow`` entry of the model's MLmodel metadata (see ``optiflow/export.py``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch
    from numpy.typing import ArrayLike, NDArray

logger = logging.getLogger("optiflow_serving")
logger.setLevel(logging.WARNING)  # importing mlflow.pytorch sets the root logger to ERROR (basicConfig)
SHOWN_NAMES = 8


def _load_pyfunc(path: str, model_config: Mapping[str, object] | None = None) -> Predictor:
    """MLflow's loader hook: ``path`` is the model's ``data`` folder (the exported program)."""
    import mlflow.pytorch
    from mlflow.models import Model

    folder = os.path.dirname(os.path.abspath(path))
    card = (Model.load(folder).metadata or {})["optiflow"]
    return Predictor(mlflow.pytorch.load_model(folder), card)


def refused(message: str) -> ValueError:
    """An input the model cannot take, said in ``message``: a ValueError that is also an MLflow bad request
    (HTTP 400), so that ``mlflow models serve`` answers with this message instead of a generic one."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    class InputRefused(MlflowException, ValueError):
        pass

    return InputRefused(message, error_code=INVALID_PARAMETER_VALUE)


@dataclass
class OutOfRange:
    """How many raw input values lie outside the range seen in training, and where."""

    values: int
    rows: int
    total_rows: int
    first: str = ""

    def message(self) -> str:
        return (f"{self.values} input values in {self.rows} of {self.total_rows} rows lie outside the range seen "
                f"in training ({self.first}): the model extrapolates there, so check their units")


class Predictor:
    """Raw rows in, a DataFrame out: one probability column per class (named by the class) for
    classification, ``prediction`` (``prediction_0..k-1``) in the target's units for regression.

    It takes the forms the dataset comes in: a DataFrame with the training columns by name (any
    order, others ignored), an array shaped ``(N, *input_shape)``, flat rows ``(N, values per sample)``,
    and for one-channel images ``(N, H, W)``.  Values outside the range seen in training are
    predicted, counted and logged as a warning (also ``result.attrs["out_of_range"]``)."""

    def __init__(self, module: Callable[[torch.Tensor], torch.Tensor], card: dict[str, Any]) -> None:
        self.module = module
        self.card = card

    def predict(self, data: pd.DataFrame | dict[str, ArrayLike] | ArrayLike,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        x, index = self.inputs(data)
        outside = self.out_of_range(x)
        if outside is not None:
            logger.warning(outside.message())
        result = self.outputs(x, index)
        result.attrs["out_of_range"] = outside.values if outside is not None else 0
        return result

    def outputs(self, x: NDArray[np.float32], index: pd.Index | None = None) -> pd.DataFrame:
        """The model's answer for ``x`` (as :meth:`inputs` gives it) as a DataFrame."""
        import numpy as np
        import pandas as pd
        import torch

        with torch.no_grad():
            outputs = self.module(torch.from_numpy(x)).numpy().astype(np.float64).reshape(len(x), -1)
        return pd.DataFrame(outputs, columns=self.columns(outputs.shape[1]), index=index)

    def inputs(self, data: pd.DataFrame | dict[str, ArrayLike] | ArrayLike
               ) -> tuple[NDArray[np.float32], pd.Index | None]:
        """``data`` as a contiguous float32 array shaped ``(N, *input_shape)``, and the row index to keep."""
        import numpy as np
        import pandas as pd

        shape = tuple(int(d) for d in self.card["input_shape"])
        size = math.prod(shape)
        index = None
        if isinstance(data, dict):
            data = pd.DataFrame(data)
        if isinstance(data, pd.DataFrame):
            index = data.index
            data = self._columns(data, size)
        try:
            x = np.require(data, np.float32, ["C", "W"])  # writable: pandas' copy-on-write views are read-only
        except (TypeError, ValueError) as exc:
            raise refused(f"inputs must be numbers ({exc})") from None
        if x.size == 0:
            raise refused(f"no rows to predict: the input (shape {list(x.shape)}) is empty")
        if x.shape == shape or (x.ndim == 1 and x.shape[0] == size):
            x = x.reshape(1, *shape)  # one sample
        elif x.ndim == 2 and x.shape[1] == size:
            x = x.reshape(len(x), *shape)  # flat rows
        elif self.card.get("image") and shape[0] == 1 and x.shape[1:] == shape[1:]:
            x = x.reshape(len(x), *shape)  # one-channel images without their channel axis
        elif len(shape) == 1 and as_grid(x.shape[1:], self.card.get("feature_names")):
            x = x.reshape(len(x), size)  # a flat model of an image's pixels, given images
        if x.shape[1:] != shape:
            dims = ", ".join(map(str, shape))
            flat = f" or (N, {size})" if len(shape) > 1 else ""
            raise refused(f"inputs of shape {list(x.shape)}; the model takes (N, {dims}){flat}")
        bad = ~np.isfinite(x.reshape(len(x), -1))
        if bad.any():
            raise refused(f"row {int(np.argwhere(bad)[0][0])} holds NaN or infinite values")
        return np.ascontiguousarray(x), index

    def _columns(self, frame: pd.DataFrame, size: int) -> pd.DataFrame:
        """The training columns of ``frame`` in training order: by name, else (unnamed columns) by position."""
        import pandas as pd

        names = self.card.get("feature_names")
        if names and set(names) <= set(frame.columns):
            return frame[names]
        positional = isinstance(frame.columns, pd.RangeIndex) or not names
        if positional and len(frame.columns) == size:
            return frame
        if not names:
            raise refused(f"inputs with {len(frame.columns)} columns; the model takes {size}")
        missing = [n for n in names if n not in set(frame.columns)]
        shown = ", ".join(repr(n) for n in missing[:SHOWN_NAMES])
        more = f" and {len(missing) - SHOWN_NAMES} more" if len(missing) > SHOWN_NAMES else ""
        raise refused(f"inputs lack the column{'s' if len(missing) > 1 else ''} {shown}{more} "
                         f"(the model takes the {len(names)} columns it was trained on, by name, in any order)")

    def out_of_range(self, x: NDArray[np.float32]) -> OutOfRange | None:
        """The values of ``x`` (raw, as :meth:`inputs` gives it) outside the training range; None when all are inside."""
        import numpy as np

        bounds = self.card.get("input_range")
        if not bounds or not bounds.get("low") or len(x) == 0:
            return None
        low, high = np.asarray(bounds["low"], np.float64), np.asarray(bounds["high"], np.float64)
        flat = x.reshape(len(x), -1).astype(np.float64)
        if len(low) not in (1, flat.shape[1]):
            return None
        slack = 1e-5 * np.maximum(np.maximum(np.abs(low), np.abs(high)), 1e-12)
        outside = (flat < low - slack) | (flat > high + slack)
        if not outside.any():
            return None
        row, column = (int(i) for i in np.argwhere(outside)[0])
        where = 0 if len(low) == 1 else column
        names = self.card.get("feature_names")
        label = f"'{names[column]}' " if len(low) > 1 and names else ""
        first = f"{label}{flat[row, column]:.6g} where training saw {low[where]:.6g}..{high[where]:.6g}"
        return OutOfRange(int(outside.sum()), int(outside.any(axis=1).sum()), len(x), f"e.g. row {row}: {first}")

    def columns(self, width: int) -> list[str]:
        if self.card["task"] == "classification":
            return [str(c) for c in self.card["classes"]]
        return ["prediction"] if width == 1 else [f"prediction_{i}" for i in range(width)]


def as_grid(sample_shape: tuple[int, ...], feature_names: list[str] | None) -> bool:
    """Whether samples shaped ``sample_shape`` are the images ``(1, H, W)`` or ``(H, W)`` whose pixels a flat
    model takes as its features ``pixel_<row>_<column>`` (digits trained with ``image=false``)."""
    names = list(feature_names or ())
    if not names or not names[-1].startswith("pixel_"):
        return False
    try:
        height, width = (int(n) + 1 for n in names[-1].split("_")[1:])
    except ValueError:
        return False
    grid = [f"pixel_{row}_{column}" for row in range(height) for column in range(width)]
    return names == grid and tuple(sample_shape) in ((height, width), (1, height, width))
