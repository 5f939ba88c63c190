"""The model a finished run logs: raw input -> fitted normalizer -> trained model -> class
probabilities (classification) or the target in its original units (regression).

The logged MLflow model (``runs:/<id>/model``) holds this pipeline as one exported torch program
(``data/model.pt2``, written by ``torch.export``; no pickle) under two flavors:

- ``pytorch``: ``mlflow.pytorch.load_model(uri)`` gives torch's inference graph, callable on a
  raw batch and already in inference mode (torch refuses ``.eval()``/``.train()`` on it);
  :func:`load_module` gives the same program as a plain ``nn.Module``, read as data
  (:mod:`optiflow.model_file`): unlike ``mlflow.pytorch.load_model`` and ``torch.export.load``,
  it runs nothing found in the store.
- ``python_function``: ``optiflow_serving`` (a copy of ``optiflow/serving.py`` inside the model)
  turns raw rows into a DataFrame named by the classes, also under ``mlflow models serve``.
  MLflow imports that module from the model's folder: serve and ``pyfunc``-load only models you trust.
  ``optiflow predict`` never does; it uses optiflow's own copy with :func:`load_program`.

The MLmodel metadata's ``optiflow`` entry (:class:`ModelCard`) says what it takes and gives.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from optiflow.errors import OptiflowError, first_line
from optiflow.export_ahead import Ahead, beside, exporting
from optiflow.run import EXAMPLE_SAMPLES, Run
from optiflow.stores import quiet_artifact_downloads
from optiflow.tracking import client, resolve_tracking_uri, retry

if TYPE_CHECKING:
    from mlflow.models import Model

SERVING_MODULE = "optiflow_serving"
NORMALIZED_INPUT_TAG = "optiflow.model_input"


class InferenceModule(nn.Module):
    """``scale`` (raw values to the training's scale) then ``normalizer`` then ``model``, then a softmax
    (classification) or ``* target_scale`` (regression)."""

    def __init__(self, normalizer: nn.Module, model: nn.Module, classification: bool, target_scale: float,
                 raw_scale: float = 1.0) -> None:
        super().__init__()
        self.scale = RawScale(raw_scale)
        self.normalizer = normalizer
        self.model = model
        self.classification = classification
        self.target_scale = target_scale

    def forward(self, x: Tensor) -> Tensor:
        outputs = self.model(self.normalizer(self.scale(x)))
        return outputs.softmax(dim=1) if self.classification else outputs * self.target_scale


class RawScale(nn.Module):
    """Raw values, as the dataset's source holds them (digits' 0..16, 0..255 pixels), divided by
    ``divisor`` as the core divided them before training (:class:`~optiflow.data.DataSource`)."""

    divisor: Tensor

    def __init__(self, divisor: float) -> None:
        super().__init__()
        self.register_buffer("divisor", torch.tensor(float(divisor)))

    def forward(self, x: Tensor) -> Tensor:
        return x / self.divisor


@dataclass
class ModelCard:
    """What the logged model takes and gives (its MLmodel metadata under ``optiflow``).

    ``input_shape`` is one raw sample's shape, ``feature_names`` the raw columns' names (of the
    flattened sample for images; None for unnamed features); ``target`` names the column holding
    the labels (or values) in the dataset; ``raw_input`` is False only when the run's normalizer could
    not become part of the model (then the model takes normalized inputs).  ``raw_scale`` is what the
    model divides raw values by; ``input_range`` the raw values seen in training (``low`` and ``high``:
    one value each for data in one unit such as pixels, else one per feature), outside which
    predictions extrapolate.
    """

    task: str
    classes: list[str] | None
    feature_names: list[str] | None
    input_shape: list[int]
    image: bool
    target: str | None
    dataset: str
    raw_input: bool = True
    raw_scale: float = 1.0
    input_range: dict[str, list[float]] | None = None

    def metadata(self) -> dict[str, Any]:
        return {"optiflow": asdict(self)}

    def output_columns(self, width: int) -> list[str]:
        if self.classes is not None:
            return list(self.classes)
        return ["prediction"] if width == 1 else [f"prediction_{i}" for i in range(width)]


def inference_module(run: Run) -> tuple[InferenceModule, ModelCard, Tensor]:
    """The run's logged pipeline (on the CPU, in eval mode; the run's own model untouched), its
    card and a few raw samples to export it with."""
    source = run.source
    fitted = normalizer_module(run.normalizer)
    raw_input = fitted is not None
    raw_scale = float(source.raw_scale or 1.0) if raw_input else 1.0
    model = copy.deepcopy(run.model).cpu().to(memory_format=torch.contiguous_format)
    classification = source.task == "classification"
    module = InferenceModule(fitted or nn.Identity(), model, classification, float(source.target_scale),
                             raw_scale).eval()
    example = (source.x if raw_input else run.splits.x_train).detach()[:EXAMPLE_SAMPLES].cpu().contiguous()
    if raw_scale != 1.0:
        example = (example * raw_scale).round(decimals=4)
    classes = None
    if classification:
        classes = [str(c) for c in (source.classes or range(int(source.num_classes or 0)))]
    shape = list(example.shape[1:])
    low, high = run.input_range or ([], [])
    card = ModelCard(
        task=source.task,
        classes=classes,
        feature_names=list(source.feature_names) if raw_input and source.feature_names else None,
        input_shape=shape,
        image=bool(source.image) and len(shape) == 3,
        target=source.target,
        dataset=run.plan.data[0].name,
        raw_input=raw_input,
        raw_scale=raw_scale,
        input_range={"low": list(low), "high": list(high)} if raw_input and low else None,
    )
    return module, card, example


def normalizer_module(normalizer: object) -> nn.Module | None:
    """The fitted normalizer as a torch module (on the CPU), or None when it cannot give one."""
    give = getattr(normalizer, "module", None)
    fitted = give() if callable(give) else None
    return copy.deepcopy(fitted).cpu() if isinstance(fitted, nn.Module) else None


def save_model(path: str, mlflow_model: Model, *, module: InferenceModule, card: ModelCard, example: Tensor,
               ahead: Ahead | None = None, **kwargs: object) -> None:
    """The MLflow flavor hook ``Model.log(flavor=optiflow.export, ...)`` calls: ``module`` exported
    under the ``pytorch`` flavor, served through ``optiflow_serving``.

    The logged signature gives the outputs only (MLflow's ``pt2`` export needs a tensor one, replaced
    once exported): an input schema would make MLflow refuse, before the model sees them, forms the
    model takes (``(N, 64)`` rows of a ``(N, 1, 8, 8)`` model, integer columns where it declares
    doubles); ``optiflow_serving`` checks inputs itself, naming what is wrong.  The export is the program traced
    ``ahead`` (:mod:`optiflow.export_ahead`) when that one is the same."""
    import mlflow.pytorch
    import numpy as np
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.models.utils import _save_example
    from mlflow.types import ColSpec, Schema, TensorSpec

    with torch.no_grad():
        computed = module(example)
    width = int(computed.reshape(len(example), -1).shape[1])
    array = example.numpy().astype(np.float32)
    outputs = Schema([ColSpec("double", name) for name in card.output_columns(width)])
    traced = ModelSignature(Schema([TensorSpec(np.dtype(np.float32), (-1, *card.input_shape))]), outputs)
    with tempfile.TemporaryDirectory() as staging, _requirements_checked_directly(), \
            exporting(ahead, module, computed):
        code = Path(staging) / f"{SERVING_MODULE}.py"
        shutil.copyfile(Path(__file__).with_name("serving.py"), code)
        mlflow.pytorch.save_model(
            module, path, mlflow_model=mlflow_model, signature=traced,
            input_example=array, serialization_format="pt2", code_paths=[str(code)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
                              f"pandas=={pd.__version__}"],
        )
    mlflow_model.flavors["python_function"]["loader_module"] = SERVING_MODULE
    mlflow_model.signature = ModelSignature(outputs=outputs)
    if card.feature_names and not card.image:
        _save_example(mlflow_model, pd.DataFrame(array.reshape(len(array), -1), columns=card.feature_names), path)
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))


@contextlib.contextmanager
def _requirements_checked_directly() -> Iterator[None]:
    """While open, MLflow's check that the model's pip requirements match this environment asks each
    requirement's own distribution first, and makes its own check (which maps every installed
    distribution's files to its modules: most of a second) only when one does not match.  The requirements
    optiflow gives are the installed versions, so the answer, a warning or none, stays MLflow's own."""
    from mlflow.utils import environment

    check = getattr(environment, "warn_dependency_requirement_mismatches", None)
    if check is None:  # an MLflow that checks elsewhere, or not at all
        yield
        return

    def check_directly(model_requirements: list[str]) -> None:
        if not all(map(_installed, model_requirements)):
            check(model_requirements)

    environment.warn_dependency_requirement_mismatches = check_directly
    try:
        yield
    finally:
        environment.warn_dependency_requirement_mismatches = check


def _installed(requirement: str) -> bool:
    """Whether ``requirement`` (``torch==2.5.1``: no extras, markers or URL) names an installed distribution of
    a version it allows, asked as MLflow asks (its own check says the same when this says yes)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import InvalidRequirement, Requirement

    try:
        parsed = Requirement(requirement)
        plain = not (parsed.extras or parsed.marker or parsed.url)
        return plain and parsed.specifier.contains(version(parsed.name))
    except (InvalidRequirement, PackageNotFoundError, ValueError):
        return False


PROGRAM_FILE = "data/model.pt2"
PROGRAM_BYTES = 8 * 2**30


def load_program(model_uri: str) -> torch.export.ExportedProgram:
    """A logged model's exported program, read as data (:mod:`optiflow.model_file`): no code from the
    store runs, neither the model's own modules nor pickles planted in its archive. Only the program
    file is fetched from the store, and only when its size is believable."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from optiflow.model_file import UnsafeModel
    from optiflow.model_file import load_program as read_program

    quiet_artifact_downloads()
    repository = get_artifact_repository(model_uri)
    listed = [f for f in repository.list_artifacts("data") if f.path.endswith(PROGRAM_FILE)]
    if not listed or listed[0].is_dir:
        raise UnsafeModel(f"{model_uri} holds no {PROGRAM_FILE}: it was not logged by optiflow")
    if (listed[0].file_size or 0) > PROGRAM_BYTES:
        raise UnsafeModel(f"refused {model_uri}: its {PROGRAM_FILE} is {listed[0].file_size} bytes")
    with tempfile.TemporaryDirectory(prefix="optiflow-model-") as folder:
        local = repository.download_artifacts(PROGRAM_FILE, dst_path=folder)
        if not os.path.isfile(local) or os.path.getsize(local) > PROGRAM_BYTES:
            raise UnsafeModel(f"refused {model_uri}: its {PROGRAM_FILE} is not a regular file of a believable size")
        return read_program(local, label=model_uri)


def load_module(model_uri: str) -> nn.Module:
    """A logged model as a plain ``nn.Module`` (``torch.export.unflatten`` of its program, read as
    data): ``.eval()`` works, parameters keep their training names (``model.0.weight``), and it
    always computes in inference mode, as it was exported."""
    return torch.export.unflatten(load_program(model_uri))


def traced_beside(run: Run, log_model: bool) -> contextlib.AbstractContextManager[Ahead | None]:
    """While open, a fork of this process traces the model ``run`` will log (:mod:`optiflow.export_ahead`), the
    same way :func:`log_model` does."""

    def pipeline(forked: Run) -> tuple[nn.Module, Callable[[str], None]]:
        from mlflow.models import Model

        module, card, example = inference_module(forked)
        return module, lambda path: save_model(path, Model(), module=module, card=card, example=example)

    return beside(run, log_model, pipeline)


def log_model(run: Run, ahead: Ahead | None = None) -> ModelCard | None:
    """Log the run's pipeline as its ``model`` (exported by the fork tracing it ``ahead``, when it did); a normalizer
    that cannot be part of it is said once (tag ``optiflow.model_input=normalized``, and on stderr)."""
    import sys

    if run.tracker is None or run.tracker.run_id is None:  # not the process that logs (data parallel)
        return None
    module, card, example = inference_module(run)
    if not card.raw_input:
        name = run.plan.norm[0].name
        run.tracker.set_tags({NORMALIZED_INPUT_TAG: "normalized"})
        print(f"warning: normalizer '{name}' has no module(), so the logged model takes normalized inputs, "
              "not raw ones", file=sys.stderr)
    run.tracker.log_model(sys.modules[__name__], card.metadata(), module=module, card=card, example=example,
                          ahead=ahead)
    return card


def register_model(run_id: str, name: str, tracking_uri: str | None = None) -> str:
    """Register the model that run ``run_id`` logged as a new version of ``name`` in MLflow's model registry
    (created if missing); returns the version, so that ``models:/NAME/VERSION`` loads it."""
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri)
    store = client(uri)
    run = retry(store.get_run, run_id)
    found = retry(store.search_logged_models, [run.info.experiment_id],
                  f"source_run_id = '{run_id}' AND name = 'model'", max_results=1)
    if not found:
        raise OptiflowError(f"cannot register '{name}': run {run_id} logged no model")
    model_id = found[0].model_id
    try:
        retry(store.create_registered_model, name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise OptiflowError(f"cannot register the model as '{name}': {first_line(exc.message)}") from None
    try:
        version = retry(store.create_model_version, name, f"models:/{model_id}", run_id=run_id, model_id=model_id)
    except MlflowException as exc:
        raise OptiflowError(f"cannot register the model as '{name}': {first_line(exc.message)}") from None
    return str(version.version)
