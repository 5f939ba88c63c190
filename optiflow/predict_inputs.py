"""What ``optiflow predict`` feeds a model: a CSV, a ``.npy`` array, an image file or a folder of images,
read and checked against what the model takes (its :class:`ModelSpec`).

Every mistake in the input is an :class:`OptiflowError` naming the file and, where there is one,
the line and column.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optiflow.data import image_transform
from optiflow.errors import OptiflowError
from optiflow.files import beyond_float32, csv_rows, load_npy, open_image, repeated
from optiflow.serving import as_grid
from optiflow.values import is_number

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

ID_COLUMN = "id"
SHOWN_NAMES = 8
#: a misspelt column is looked for among this many unknown ones (bounded work on a header of 10^6 names)
MATCHED_COLUMNS = 1000


@dataclass(frozen=True)
class ModelSpec:
    """What a logged model takes and gives: its task, classes, raw feature names and raw sample shape
    (``raw_input`` is False for a model whose normalizer could not be part of it: it takes normalized values);
    ``raw_scale`` is the raw value that training's 1.0 stands for (255 for pixels, 16 for digits),
    ``input_range`` the raw values seen in training (see :class:`optiflow.export.ModelCard`)."""

    task: str
    classes: list[str] | None
    feature_names: list[str] | None
    input_shape: tuple[int, ...]
    image: bool
    target: str | None = None
    raw_input: bool = True
    raw_scale: float = 1.0
    input_range: dict[str, list[float]] | None = None

    def describe_input(self) -> str:
        """``1x8x8 images`` or ``4 features``: what the model takes, for messages."""
        if self.image:
            return "x".join(map(str, self.input_shape)) + " images (channels x height x width)"
        return f"{math.prod(self.input_shape)} features"


@dataclass
class Inputs:
    """Rows to predict: their ids, the raw features (a DataFrame with the feature names, else an array
    shaped ``(N, *input_shape)``), the true labels when the input had them (None where missing) and a CSV's
    columns that are neither features, target nor id (ignored)."""

    ids: list[Any]
    x: pd.DataFrame | np.ndarray
    labels: list[Any] | None = None
    ignored: list[str] = field(default_factory=list)

    def ignored_note(self) -> str | None:
        """What ``optiflow predict`` says about the ignored columns (one may hold the labels), None without any."""
        if not self.ignored:
            return None
        several = len(self.ignored) > 1
        what = "the columns {}: not features" if several else "the column {}: not a feature"
        return (f"ignored {what.format(_shown([repr(c) for c in self.ignored]))} of the model (if "
                f"{'one holds' if several else 'it holds'} the labels, name it with --target {self.ignored[0]})")


def input_file(path: str) -> Path:
    """``path`` when it is a file or folder there is something to read from, else one clear error."""
    file = Path(path).expanduser()
    if not file.exists():
        raise OptiflowError(f"input not found: {path}")
    if not file.is_dir() and not file.is_file():  # /dev/zero or a FIFO, even behind a .csv link, would hang
        raise OptiflowError(f"{path} is not a regular file (a device, pipe or socket cannot be read)")
    return file


def read_inputs(path: str, spec: ModelSpec, target: str | None = None) -> Inputs:
    """The rows of ``path`` for a model that takes ``spec``: a ``.csv``, a ``.npy``, an image or a folder of images.

    A CSV's labels are in its column ``target`` (which it must then have), else in the model's target column if there."""
    file = input_file(path)
    suffix = file.suffix.lower()
    if target is not None and (file.is_dir() or suffix not in (".csv", ".txt")):
        raise OptiflowError(f"--target names a CSV column; {path} is not a CSV (a folder of class folders gives its "
                            "labels by the folder names)")
    if file.is_dir() or suffix in image_suffixes():
        if not spec.image:
            raise OptiflowError(f"{path} holds images, but the model takes {spec.describe_input()}; give a .csv or .npy")
        files = _image_files(file) if file.is_dir() else [file]
        return read_images(file, files, spec)
    if suffix == ".npy":
        return read_npy(file, spec)
    if suffix in (".csv", ".txt"):
        return read_csv(file, spec, target)
    raise OptiflowError(f"cannot read {path}: give a .csv file, a .npy array, an image file or a folder of images")


def read_csv(file: Path, spec: ModelSpec, target: str | None = None) -> Inputs:
    """A CSV with a header: the model's feature columns by name (for images, a flattened sample's values by
    name or in order), optionally the target column (``target``, else the model's) and an ``id`` column."""
    import pandas as pd

    rows = csv_rows(file)
    if not rows:
        raise OptiflowError(f"{file} is empty; it needs a header row and at least one data row")
    header, body = [name.strip() for name in rows[0]], rows[1:]
    if not body:
        raise OptiflowError(f"{file} has a header but no data rows")
    if all(is_number(name) for name in header) and not any(is_number(n) for n in spec.feature_names or ()):
        raise OptiflowError(f"{file}: its first row holds numbers, not column names: the CSV needs a header row "
                            f"({_columns_hint(list(spec.feature_names or ()), spec)})")
    twice = repeated(header)
    if twice is not None:
        raise OptiflowError(f"{file}: column '{twice}' appears twice in the header")
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise OptiflowError(f"{file}, line {line}: {len(row)} values for {len(header)} columns")
    position = {name: i for i, name in enumerate(header)}
    if target is not None and target in (spec.feature_names or ()):
        raise OptiflowError(f"--target '{target}' is a feature column of the model; name the column holding the "
                            "labels")
    if target is not None and target not in position:
        known = set(spec.feature_names or ())
        others = [c for c in header if c not in known]
        raise OptiflowError(f"{file} has no target column '{target}'; its columns besides the model's features: "
                            f"{_shown(others) or 'none'}")
    spec = replace(spec, target=target or spec.target)
    features = _feature_columns(file, header, spec)
    values = _numbers(file, body, [position[name] for name in features], features)

    def column(name: str) -> list[str]:
        return [row[position[name]].strip() for row in body]

    ids = column(ID_COLUMN) if ID_COLUMN in position and ID_COLUMN not in features else list(range(len(body)))
    labels = None
    if spec.target and spec.target in position and spec.target not in features:
        labels = _labels(file, column(spec.target), spec)
    x = pd.DataFrame(values, columns=features) if spec.feature_names else values
    ignored = [c for c in header if c not in features and c not in (ID_COLUMN, spec.target)]
    return Inputs(ids, x, labels, ignored)


def read_npy(file: Path, spec: ModelSpec) -> Inputs:
    """An array shaped ``(N, *input_shape)`` (one sample may drop the N or be flat; images may be flat rows or lack
    a 1-channel axis), as the logged model's pyfunc takes it; an empty array is refused."""
    import numpy as np
    import pandas as pd

    array = load_npy(file)
    if array.dtype.kind not in "biuf":
        raise OptiflowError(f"{file} holds {array.dtype} values; the model takes numbers")
    shape = tuple(spec.input_shape)
    size = math.prod(shape)
    if array.size == 0:
        raise OptiflowError(f"{file} holds an empty array of shape {tuple(array.shape)}: no samples to predict")
    if array.shape == shape or (array.ndim == 1 and array.size == size):
        array = array.reshape(1, *shape)  # one sample, maybe flat
    elif array.ndim == 1:
        rows = f", here ({array.size // size}, {size})" if array.size % size == 0 else ""
        raise OptiflowError(f"{file} holds a flat array of {array.size} values; the model takes samples of {size} "
                            f"values ({spec.describe_input()}): save it shaped (N, {size}){rows}")
    elif spec.image and array.ndim == 2 and array.shape[1] == size:
        array = array.reshape(-1, *shape)
    elif spec.image and shape[0] == 1 and array.shape[1:] == shape[1:]:
        array = array[:, None]
    elif not spec.image and as_grid(array.shape[1:], spec.feature_names):
        array = array.reshape(len(array), size)
    if array.ndim == 0 or array.shape[1:] != shape:
        raise OptiflowError(f"{file} holds an array of shape {tuple(array.shape)}; {_shape_hint(array.shape, spec)}")
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array) | beyond_float32(array)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            value = array[where]
            what = "NaN or infinite values" if not np.isfinite(value) else \
                f"{value:g}, beyond the range of float32 numbers the model computes in (+-3.4e38)"
            raise OptiflowError(f"{file}, sample {where[0]}: holds {what}")
    array = array.astype(np.float32)
    x = pd.DataFrame(array, columns=spec.feature_names) if spec.feature_names and not spec.image else array
    return Inputs(list(range(len(array))), x)


def read_images(root: Path, files: list[Path], spec: ModelSpec) -> Inputs:
    """Image files converted to the model's channels (grayscale <-> RGB) and resized as the image-folder dataset does,
    their 0..255 pixels in the model's raw units (``raw_scale`` / 255 each: 0..16 for digits).

    In a folder with one sub-folder per class (as ``image-folder`` trains on), the sub-folder
    names are the labels.
    """
    import numpy as np
    import torch

    channels, height, width = _image_shape(spec)
    transform = image_transform(height, width, grayscale=channels == 1)
    tensors = [transform(open_image(file)) for file in files]
    pixels = torch.stack(tensors).float()
    x = (pixels if spec.raw_scale == 255.0 else pixels * (spec.raw_scale / 255.0)).numpy().astype(np.float32)
    ids = [f.relative_to(root).as_posix() if f != root else f.name for f in files]
    folders = [f.parent.name for f in files]
    nested = root.is_dir() and all(f.parent.parent == root for f in files)
    labels = folders if nested and spec.classes and set(folders) <= set(spec.classes) else None
    return Inputs(ids, x, labels)


def image_suffixes() -> tuple[str, ...]:
    """The file endings read as images: torchvision ImageFolder's, which training reads too."""
    return (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in image_suffixes()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise OptiflowError(f"no image files in {folder} (looked for {', '.join(image_suffixes())})")
    return files


def _image_shape(spec: ModelSpec) -> tuple[int, int, int]:
    if len(spec.input_shape) != 3 or spec.input_shape[0] not in (1, 3):
        raise OptiflowError(f"the model takes {spec.describe_input()}; image files convert only to 1-channel "
                            "(grayscale) or 3-channel (RGB) images: give a .npy array")
    channels, height, width = spec.input_shape
    return channels, height, width


def _feature_columns(file: Path, columns: list[str], spec: ModelSpec) -> list[str]:
    """The feature columns in the model's order: by name when the model has names (missing ones refused by
    name, with a close match among the others; the others ignored), else all but the id and target columns."""
    extra_ok = {ID_COLUMN, spec.target}
    if not spec.feature_names:
        features = [c for c in columns if c not in extra_ok]
        if len(features) != math.prod(spec.input_shape):
            raise OptiflowError(f"{file} has {len(features)} feature columns; the model takes {spec.describe_input()}")
        return features
    names = list(spec.feature_names)
    known, given = set(names) | extra_ok, set(columns)
    unknown = [c for c in columns if c not in known]
    missing = [n for n in names if n not in given]
    if missing:
        close = difflib.get_close_matches(missing[0], unknown[:MATCHED_COLUMNS], n=1)
        hint = f" (is '{close[0]}' it?)" if close else ""
        raise OptiflowError(f"{file} has no column '{missing[0]}'{hint}; {_columns_hint(names, spec)}")
    return names


def _columns_hint(names: list[str], spec: ModelSpec) -> str:
    target = f" (and optionally '{spec.target}')" if spec.target else ""
    return f"the model takes the columns {_shown(names)}{target}"


def _shown(names: list[str]) -> str:
    return ", ".join(names[:SHOWN_NAMES]) + (f", ... ({len(names)} in all)" if len(names) > SHOWN_NAMES else "")


def _numbers(file: Path, rows: list[list[str]], columns: list[int], names: list[str]) -> np.ndarray:
    """The feature cells as a float32 array; an empty, NaN, infinite, non-numeric cell or one beyond float32's
    range refused with its line and column."""
    import numpy as np

    cells = [[row[i] for i in columns] for row in rows]
    try:
        values = np.array(cells, dtype=np.float64)
    except ValueError:
        values = np.array([[_number(text) for text in row] for row in cells], dtype=np.float64)
    bad = ~np.isfinite(values) | beyond_float32(values)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        text = cells[row][col].strip()
        if not text:
            what = "is empty"
        elif math.isfinite(values[row, col]):
            what = f"holds {text!r}, beyond the range of float32 numbers the model computes in (+-3.4e38)"
        else:
            what = f"holds {text!r}, not a finite number"
        raise OptiflowError(f"{file}, line {row + 2}: column '{names[col]}' {what}")
    return values.astype(np.float32)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _labels(file: Path, cells: list[str], spec: ModelSpec) -> list[Any]:
    """The target column as class names (or class indices mapped to names) or numbers; None where a cell is empty."""
    present = [c.strip() for c in cells if c.strip()]
    if spec.task != "classification" or not spec.classes:
        try:
            numbers = [float(c) if c.strip() else math.nan for c in cells]
        except ValueError:
            raise OptiflowError(f"{file}: target column '{spec.target}' is not numeric") from None
        return [n if math.isfinite(n) else None for n in numbers]
    classes = list(spec.classes)
    mapping: dict[str, str | None] = {c: c for c in classes}
    if not set(present) <= set(classes):
        mapping.update({text: _class_of(text, classes) for text in present if text not in classes})
        unknown = next((text for text in present if mapping[text] is None), None)
        if unknown is not None:
            shown = ", ".join(classes[:SHOWN_NAMES]) + (", ..." if len(classes) > SHOWN_NAMES else "")
            raise OptiflowError(f"{file}: target column '{spec.target}' holds {unknown!r}, not a class of the model "
                                f"({shown})")
    return [mapping[c.strip()] if c.strip() else None for c in cells]


def _class_of(text: str, classes: list[str]) -> str | None:
    """The class a numeric label stands for: its name (``1.0`` for class ``1``) or its index into the classes."""
    try:
        number = float(text)
    except ValueError:
        return None
    if not number.is_integer():
        return None
    if str(int(number)) in classes:
        return str(int(number))
    return classes[int(number)] if 0 <= number < len(classes) else None


def _shape_hint(shape: tuple[int, ...], spec: ModelSpec) -> str:
    """Why an array does not fit: wrong channels, wrong image size, or the shape the model takes."""
    wanted = tuple(spec.input_shape)
    if spec.image and len(shape) == 4 and len(wanted) == 3:
        if shape[2:] == wanted[1:] and shape[1] != wanted[0]:
            return f"{shape[1]}-channel images, but the model takes {wanted[0]}-channel ones, shape (N, {', '.join(map(str, wanted))})"
        if shape[1] == wanted[0]:
            return (f"{shape[2]}x{shape[3]} images, but the model takes {wanted[1]}x{wanted[2]} ones "
                    "(image files are resized; arrays are not)")
    return f"the model takes (N, {', '.join(map(str, wanted))}): {spec.describe_input()}"
