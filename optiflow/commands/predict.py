"""``optiflow predict MODEL --input PATH``: a logged model's predictions on a CSV, a ``.npy`` array or images.

The logged model's contract lives here and nowhere else: where MODEL points (:func:`resolve_model`),
what its MLmodel metadata says it takes (:func:`model_spec`), and what its pyfunc ``predict`` gives
back (:func:`run_model`): a DataFrame of one probability column per class, named by the class, or of
``prediction`` (``prediction_0..k-1``) columns in the target's units.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TextIO

from optiflow.errors import DiskFull, OptiflowError, first_line, no_space
from optiflow.predict_inputs import ID_COLUMN, ModelSpec, input_file, read_inputs
from optiflow.serving import OutOfRange, Predictor
from optiflow.stores import quiet_artifact_downloads

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from mlflow.models import Model

RUNS_URI = re.compile(r"^runs:/(?P<run>[^/]+)(?:/(?P<path>.*))?$")
DEFAULT_MODEL_PATH = "model"
NO_MODEL_HINT = ("train and the refit run of a search log one; compare children and search trials do not, "
                 "unless asked with --log-models (or --register)")


@dataclass
class Score:
    """Accuracy (classification) or RMSE (regression) on the rows whose label the input gave."""

    name: str
    value: float
    rows: int


@dataclass
class Predictions:
    """The predictions table (``id``, ``prediction`` columns, ``prob_<class>`` columns) and its score."""

    model_uri: str
    spec: ModelSpec
    table: pd.DataFrame
    labels: list[Any] | None
    score: Score | None
    #: input values outside the range seen in training (predicted, but to be reported)
    out_of_range: OutOfRange | None = None
    #: what to say about the input's columns that were ignored (:meth:`Inputs.ignored_note`)
    ignored: str | None = None


def predict(model: str, input_path: str, tracking_uri: str | None = None, target: str | None = None) -> Predictions:
    """Predict the rows of ``input_path`` with ``model`` (a run id, ``runs:/ID/path`` or ``models:/NAME/VERSION``);
    a CSV's labels are in its column ``target``, else in the column named as the model's target."""
    input_file(input_path)  # missing or unreadable input: refused before the model is loaded
    uri, label = resolve_model(model, tracking_uri)
    spec = model_spec(uri, label)
    inputs = read_inputs(input_path, spec, target)
    output, outside = run_model(uri, inputs.x, spec)
    table = prediction_table(inputs.ids, output, spec)
    return Predictions(uri, spec, table, inputs.labels, score(table, inputs.labels, spec), outside,
                       inputs.ignored_note())


def write_predictions(predictions: Predictions, out: str | os.PathLike[str] | TextIO) -> None:
    """The predictions as CSV to a path (written whole or not at all) or an open text stream."""
    from optiflow.stores import write_whole

    try:
        if isinstance(out, (str, os.PathLike)):
            write_whole(out, predictions.table.to_csv(index=False).encode())
        else:
            predictions.table.to_csv(out, index=False)
    except (BrokenPipeError, DiskFull):
        raise
    except OSError as exc:
        where = os.fspath(out) if isinstance(out, (str, os.PathLike)) else out.name
        raise no_space(exc, where) or OptiflowError(f"cannot write {where}: {exc.strerror or first_line(exc)}") from None


def resolve_model(model: str, tracking_uri: str | None = None) -> tuple[str, str]:
    """The model URI MODEL stands for and how to name it in messages; an unknown run is refused.

    ``runs:/`` and ``models:/`` URIs resolve against the tracking store, made MLflow's current one.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from optiflow.tracking import client, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, existing=True)
    store = client(uri)
    mlflow.set_tracking_uri(uri)
    quiet_artifact_downloads()
    if model.startswith("models:/"):
        return model, model
    match = RUNS_URI.match(model)
    run_id = match.group("run") if match else model
    path = (match.group("path") or "").strip("/") if match else ""
    try:
        store.get_run(run_id)
    except MlflowException:
        raise OptiflowError(f"no run '{run_id}' in the tracking store {uri} (MODEL is a run id, runs:/ID/model "
                            "or models:/NAME/VERSION)") from None
    return f"runs:/{run_id}/{path or DEFAULT_MODEL_PATH}", f"run '{run_id}'"


def model_spec(uri: str, label: str) -> ModelSpec:
    """What the model at ``uri`` takes and gives, from the ``optiflow`` entry of its MLmodel metadata."""
    from mlflow.exceptions import MlflowException

    check_card_size(uri, label)
    try:
        logged = _loaded_card(uri)
    except MlflowException as exc:
        if uri.startswith("runs:/"):
            where = uri.split("/", 2)[2]
            raise OptiflowError(f"{label} has no logged model at '{where}' ({NO_MODEL_HINT})") from None
        raise OptiflowError(f"cannot load {label}: {first_line(exc)}") from None
    meta = (logged.metadata or {}).get("optiflow")
    if not isinstance(meta, dict):
        raise OptiflowError(f"the model of {label} has no optiflow metadata: it was logged by an older optiflow "
                            "or by another tool; retrain it with optiflow train")
    try:
        return card_spec(meta)
    except (KeyError, TypeError, ValueError) as exc:
        raise OptiflowError(f"the optiflow metadata of the model of {label} is incomplete or malformed "
                            f"({first_line(exc)})") from None


def _loaded_card(uri: str) -> Model:
    """The model's MLmodel metadata, downloaded into a temporary folder removed afterwards (``Model.load`` of a
    ``runs:/`` or ``models:/`` URI leaves its copy in ``$TMPDIR``)."""
    import tempfile

    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    if ModelsArtifactRepository._is_logged_model_uri(uri):  # models:/m-ID: as Model.load reads it
        uri = ModelsArtifactRepository.get_underlying_uri(uri)
    with tempfile.TemporaryDirectory(prefix="optiflow-model-") as folder:
        return Model.load(download_artifacts(artifact_uri=f"{uri.rstrip('/')}/MLmodel", dst_path=folder))


CARD_ITEMS = 1_000_000
CARD_BYTES = 16 * 2**20


def check_card_size(uri: str, label: str) -> None:
    """An MLmodel file over 16 MB is refused before YAML parses it (a 3 MB one takes PyYAML half a minute)."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        listed = get_artifact_repository(uri).list_artifacts("")
    except (MlflowException, OSError):
        return  # Model.load says what is missing
    card = next((f for f in listed if os.path.basename(f.path) == "MLmodel"), None)
    if card is not None and (card.file_size or 0) > CARD_BYTES:
        raise OptiflowError(f"refused the model of {label}: its MLmodel file is {card.file_size:,} bytes "
                            f"(optiflow writes a few kB; at most {CARD_BYTES:,} are read)")
SAMPLE_VALUES = 2**24


def card_spec(meta: dict[str, Any]) -> ModelSpec:
    """The card's entries, checked to be what optiflow writes before anything is built from them: scalar
    class names, string feature names, a shape of 1 to 4 positive sizes with at most 2**24 values."""
    def listed(key: str, kinds: tuple[type, ...]) -> list[Any] | None:
        value = meta.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) > CARD_ITEMS or not all(isinstance(v, kinds) for v in value):
            raise ValueError(f"'{key}' is not a list of at most {CARD_ITEMS} {'/'.join(k.__name__ for k in kinds)}")
        return value

    classes = listed("classes", (str, int, float))
    names = listed("feature_names", (str,))
    shape = listed("input_shape", (int,)) or []
    if not 1 <= len(shape) <= 4 or min(shape) < 1 or math.prod(shape) > SAMPLE_VALUES:
        raise ValueError(f"'input_shape' {shape[:8]} is not 1 to 4 positive sizes of at most {SAMPLE_VALUES} values")
    bounds = meta.get("input_range")
    if bounds is not None and not isinstance(bounds, dict):
        raise ValueError("'input_range' is not a mapping")
    low, high = (listed_range(bounds, key) for key in ("low", "high")) if bounds else (None, None)
    target = meta.get("target")
    return ModelSpec(task=str(meta["task"]), classes=None if classes is None else [str(c) for c in classes],
                     feature_names=names, input_shape=tuple(shape), image=bool(meta.get("image")),
                     target=target if isinstance(target, str) else None, raw_input=bool(meta.get("raw_input", True)),
                     raw_scale=float(meta.get("raw_scale", 1.0)),
                     input_range=None if low is None or high is None else {"low": low, "high": high})


def listed_range(bounds: dict[str, Any], key: str) -> list[float]:
    values = bounds.get(key)
    if not isinstance(values, list) or len(values) > SAMPLE_VALUES or not all(
            isinstance(v, (int, float)) for v in values):
        raise ValueError(f"'input_range.{key}' is not a list of numbers")
    return [float(v) for v in values]


def run_model(uri: str, x: pd.DataFrame | np.ndarray, spec: ModelSpec) -> tuple[pd.DataFrame, OutOfRange | None]:
    """The model's output for ``x``, checked against the contract (a DataFrame with the promised columns),
    and the input values outside the range seen in training.

    The model is read as data (:func:`optiflow.export.load_program`) and run by optiflow's own
    :class:`~optiflow.serving.Predictor`: no module, loader or pickle found in the store runs."""
    import pandas as pd

    from optiflow.export import load_program

    model = Predictor(load_program(uri).module(), asdict(spec))
    try:
        inputs, index = model.inputs(x)
        outside = model.out_of_range(inputs)
        output = model.outputs(inputs, index)
    except (ValueError, RuntimeError) as exc:
        raise OptiflowError(f"the model refused the input: {first_line(exc)}") from None
    if not isinstance(output, pd.DataFrame):
        raise OptiflowError(f"the model at {uri} returns {type(output).__name__}, not a table of named columns")
    output.columns = [str(c) for c in output.columns]
    expected = expected_columns(spec, output)
    if list(output.columns) != expected or len(output) != len(x):
        raise OptiflowError(f"the model at {uri} returned {len(output)} rows of columns "
                            f"{', '.join(output.columns)}; expected {len(x)} rows of {', '.join(expected)}")
    return output, outside


def expected_columns(spec: ModelSpec, output: pd.DataFrame) -> list[str]:
    """The model's output columns by the contract: the classes, or ``prediction`` / ``prediction_0..k-1``."""
    if spec.task == "classification":
        return list(spec.classes or [])
    width = len(output.columns)
    return ["prediction"] if width == 1 else [f"prediction_{i}" for i in range(width)]


def prediction_table(ids: list[Any], output: pd.DataFrame, spec: ModelSpec) -> pd.DataFrame:
    """``id``, the predicted class name (or value) and, for classification, ``prob_<class>`` columns."""
    import pandas as pd

    table = pd.DataFrame({ID_COLUMN: ids})
    if spec.task != "classification":
        for column in output.columns:
            table[column] = output[column].to_numpy()
        return table
    probabilities = output.to_numpy(dtype=float)
    classes = list(output.columns)
    table["prediction"] = [classes[i] for i in probabilities.argmax(axis=1)]
    for i, name in enumerate(classes):
        table[f"prob_{name}"] = probabilities[:, i]
    return table


def score(table: pd.DataFrame, labels: list[Any] | None, spec: ModelSpec) -> Score | None:
    """Accuracy or RMSE over the labelled rows; None without labels (or for several regression targets)."""
    if labels is None or "prediction" not in table.columns:
        return None
    pairs = [(p, y) for p, y in zip(table["prediction"], labels) if y is not None]
    if not pairs:
        return None
    if spec.task == "classification":
        return Score("accuracy", sum(p == y for p, y in pairs) / len(pairs), len(pairs))
    return Score("rmse", math.sqrt(sum((float(p) - y) ** 2 for p, y in pairs) / len(pairs)), len(pairs))
