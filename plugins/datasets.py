"""Datasets: the tensors a run trains and tests on.

scikit-learn's bundled sets (no download), the classic synthetic regression
problems (seeded by ``--seed``), torchvision's MNIST, Fashion-MNIST and
CIFAR-10 read from ``--data-dir`` in their standard on-disk layout, and a
user's own CSV file or folder of images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from optiflow import hookimpl
from optiflow.data import DataContext, DataSource, image_transform
from optiflow.errors import OptiflowError, first_line
from optiflow.files import beyond_float32, csv_rows, open_image, repeated
from optiflow.values import is_number


@hookimpl
def optiflow_register_data(register):
    for name, factory in DATASETS.items():
        register(name, factory)


# --- scikit-learn's bundled datasets -------------------------------------------------------------


def digits(ctx: DataContext, *, image: bool = True) -> DataSource:
    """scikit-learn's bundled handwritten digits (1,797 samples, 10 classes): 1x8x8 images of 0..16 pixels; image=false: 64 features."""
    import torch

    data, target = _digits_arrays()
    x = torch.tensor(data, dtype=torch.float32)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    y = torch.tensor(target, dtype=torch.long)
    return DataSource(x, y, "classification", num_classes=10, classes=[str(c) for c in range(10)],
                      image=image, feature_names=list(DIGITS_FEATURES), target="target", raw_scale=16.0)


#: load_digits' feature names: pixel_<row>_<column>
DIGITS_FEATURES = [f"pixel_{row}_{column}" for row in range(8) for column in range(8)]


def _digits_arrays():
    """``load_digits()``'s data (float64, 1797 x 64) and target (int), read from the file scikit-learn
    ships (``sklearn/datasets/data/digits.csv.gz``) as load_digits reads it, without importing
    scikit-learn: its import (and SciPy's and pandas' with it) costs the default run more than its training."""
    import gzip
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = [Path(folder) / "datasets" / "data" / "digits.csv.gz" for folder in folders]
    found = next((file for file in files if file.is_file()), None)
    if found is None:
        raise OptiflowError("digits: scikit-learn's bundled digits.csv.gz was not found; install scikit-learn")
    with gzip.open(found, mode="rt", encoding="utf-8") as handle:
        table = np.loadtxt(handle, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int, copy=False)


def iris(ctx: DataContext) -> DataSource:
    """Fisher's iris flowers (150 samples, 4 features, 3 classes), bundled with scikit-learn."""
    return _sklearn_classification("load_iris")


def wine(ctx: DataContext) -> DataSource:
    """Wine cultivars from chemical analysis (178 samples, 13 features, 3 classes), bundled with scikit-learn."""
    return _sklearn_classification("load_wine")


def breast_cancer(ctx: DataContext) -> DataSource:
    """Wisconsin breast cancer diagnosis (569 samples, 30 features, 2 classes), bundled with scikit-learn."""
    return _sklearn_classification("load_breast_cancer")


def diabetes(ctx: DataContext, *, target_scale: float = 100.0) -> DataSource:
    """Diabetes progression regression (442 samples, 10 features); the target is divided by target_scale."""
    import torch
    from sklearn.datasets import load_diabetes

    if target_scale <= 0:
        raise OptiflowError(f"diabetes: target_scale must be > 0, got {target_scale}")
    bunch = load_diabetes()
    x = torch.tensor(bunch.data, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.float32) / target_scale
    return DataSource(x, y, "regression", meta={"target_scale": target_scale}, feature_names=list(bunch.feature_names),
                      target="target", target_scale=target_scale)


def _sklearn_classification(loader: str) -> DataSource:
    import sklearn.datasets
    import torch

    bunch = getattr(sklearn.datasets, loader)()
    x = torch.tensor(bunch.data, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.long)
    return DataSource(x, y, "classification", num_classes=len(bunch.target_names),
                      classes=[str(c) for c in bunch.target_names], feature_names=list(bunch.feature_names),
                      target="target")


# --- synthetic regression problems ---------------------------------------------------------------


def linear(ctx: DataContext, *, n: int = 200, noise: float = 0.5) -> DataSource:
    """y = 3x + 2 + noise, x uniform on [-1, 1], Gaussian noise of std `noise` (seeded)."""
    return _synthetic(ctx, n, noise, (-1.0, 1.0), lambda x: 3 * x + 2)


def sine(ctx: DataContext, *, n: int = 500, noise: float = 0.1) -> DataSource:
    """y = sin(x) + noise, x uniform on [-5, 5], Gaussian noise of std `noise` (seeded)."""
    import torch

    return _synthetic(ctx, n, noise, (-5.0, 5.0), torch.sin)


def cubic(ctx: DataContext, *, n: int = 200, noise: float = 0.1) -> DataSource:
    """y = x^3 + noise, x uniform on [-1, 1], Gaussian noise of std `noise` (seeded)."""
    return _synthetic(ctx, n, noise, (-1.0, 1.0), lambda x: x**3)


def _synthetic(ctx: DataContext, n: int, noise: float, interval: tuple[float, float], function) -> DataSource:
    """``n`` points of ``function`` on ``interval`` plus seeded Gaussian noise: x shaped (n, 1), y shaped (n,)."""
    import torch

    if not 10 <= n <= 10**8:
        raise OptiflowError(f"synthetic datasets need n in [10, 100000000] samples, got {n}")
    if noise < 0:
        raise OptiflowError(f"noise must be >= 0, got {noise}")
    generator = torch.Generator().manual_seed(ctx.seed)
    low, high = interval
    x = torch.rand(n, 1, generator=generator) * (high - low) + low
    y = function(x).squeeze(1) + noise * torch.randn(n, generator=generator)
    return DataSource(x, y, "regression", meta={"noise": noise}, feature_names=["x"], target="y")


# --- torchvision image datasets ------------------------------------------------------------------


def mnist(ctx: DataContext, *, subset: int = 0, download: bool = True) -> DataSource:
    """MNIST handwritten digits (60k/10k 1x28x28) from <data-dir>/MNIST/raw; downloaded when missing."""
    return _torchvision_dataset(ctx, "MNIST", subset, download)


def fashion_mnist(ctx: DataContext, *, subset: int = 0, download: bool = True) -> DataSource:
    """Fashion-MNIST clothing images (60k/10k 1x28x28) from <data-dir>/FashionMNIST/raw; downloaded when missing."""
    return _torchvision_dataset(ctx, "FashionMNIST", subset, download)


def cifar10(ctx: DataContext, *, subset: int = 0, download: bool = True) -> DataSource:
    """CIFAR-10 (50k/10k 3x32x32, 10 classes) from <data-dir>/cifar-10-batches-py; downloaded when missing."""
    from optiflow_plugins import cifar_batches

    root = Path(ctx.data_dir)
    folder = root / "cifar-10-batches-py"
    names = [*cifar_batches.TRAIN_BATCHES, cifar_batches.TEST_BATCH, cifar_batches.META]
    if not all((folder / name).is_file() for name in names):
        _fetch(lambda: _download_cifar10(root), "CIFAR10", folder, download)
    train, test = cifar_batches.read_split(folder, train=True), cifar_batches.read_split(folder, train=False)
    return _image_source(ctx, train, test, cifar_batches.read_classes(folder), folder, subset)


def _torchvision_dataset(ctx: DataContext, class_name: str, subset: int, download: bool) -> DataSource:
    """Train and test sets through torchvision's own dataset class; ``subset`` > 0 keeps that many training samples."""
    from torchvision import datasets

    dataset_class = getattr(datasets, class_name)
    root = Path(ctx.data_dir)
    location = root / class_name / "raw"
    _gunzip_missing(dataset_class, location)
    train, test = _open(dataset_class, root, location, download)
    return _image_source(ctx, (train.data, train.targets), (test.data, test.targets), list(train.classes), location,
                         subset)


def _image_source(ctx: DataContext, train, test, classes: list[str], location: Path, subset: int) -> DataSource:
    """A DataSource of (images, labels) pairs; ``subset`` > 0 keeps that many training samples (seeded)."""
    import torch

    if subset < 0:
        raise OptiflowError(f"subset must be >= 0 (0 keeps every sample), got {subset}")
    x, y = _images(train[0]), torch.as_tensor(train[1], dtype=torch.long)
    if subset and subset < len(x):
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(ctx.seed))[:subset]
        x, y = x[keep], y[keep]
    return DataSource(x, y, "classification", num_classes=len(classes), classes=classes,
                      x_test=_images(test[0]), y_test=torch.as_tensor(test[1], dtype=torch.long),
                      meta={"root": str(location)})


def _download_cifar10(root: Path) -> None:
    """torchvision's CIFAR-10 download (the archive's md5 checked, then unpacked); its loader is never run."""
    from torchvision import datasets

    downloader = datasets.CIFAR10.__new__(datasets.CIFAR10)
    downloader.root = str(root)
    downloader.download()


def _gunzip_missing(dataset_class, raw: Path) -> None:
    """Unpack ``*-ubyte.gz`` files that sit in the raw folder without their unpacked copy (as torchvision would)."""
    import gzip
    import shutil

    for archive_name, _ in dataset_class.resources:
        archive, target = raw / archive_name, raw / archive_name.removesuffix(".gz")
        if archive.is_file() and not target.is_file():
            with gzip.open(archive, "rb") as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)


def _open(dataset_class, root: Path, location: Path, download: bool):
    """The train and test datasets, downloading only when the files are missing and ``download`` allows it."""
    try:
        return dataset_class(root, train=True), dataset_class(root, train=False)
    except RuntimeError:
        _fetch(lambda: dataset_class(root, train=True, download=True), dataset_class.__name__, location, download)
    return dataset_class(root, train=True), dataset_class(root, train=False)


def _fetch(download_files, name: str, location: Path, download: bool) -> None:
    """Run ``download_files`` when ``download`` allows it; one clear line when it is not allowed or fails."""
    import contextlib
    import sys

    if not download:
        raise OptiflowError(
            f"{name} files not found in {location}; copy them there or allow the download (download=true)"
        )
    try:
        with contextlib.redirect_stdout(sys.stderr):
            download_files()
    except Exception as exc:
        raise OptiflowError(
            f"{name} files not found in {location} and the download failed ({_last_reason(exc)}); "
            "copy the files there in torchvision's layout"
        ) from None


def _last_reason(exc: Exception) -> str:
    """The innermost cause in torchvision's (possibly multi-mirror, multi-line) download error."""
    lines = [line.strip() for line in str(exc).splitlines()]
    causes = [line for line in lines if line and not line.startswith(("Tried ", "Error downloading"))]
    return (causes[-1] if causes else type(exc).__name__)[:160]


def _images(images):
    """Images (N, H, W) or (N, H, W, C) as one uint8 tensor shaped (N, C, H, W)."""
    import torch

    data = torch.as_tensor(images)
    return data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2).contiguous()


# --- the user's own files ------------------------------------------------------------------------


def csv(ctx: DataContext, *, path: str = "", target: str = "target",
        task: Literal["auto", "classification", "regression"] = "auto", delimiter: str = ",") -> DataSource:
    """A CSV file with a header row: numeric feature columns and the `target` column (auto: text or <= 20 integer values -> classes)."""
    import torch

    file = _user_path(ctx, "csv", path)
    if file.exists() and not file.is_file() and not file.is_dir():
        raise OptiflowError(f"dataset 'csv': {file} is not a regular file (a device, pipe or socket cannot be read)")
    if len(delimiter) != 1 or delimiter in "\"\r\n":
        raise OptiflowError(f"dataset 'csv': delimiter must be one character other than a quote or newline, "
                            f"got {delimiter!r}")
    rows = csv_rows(file, delimiter)
    if len(rows) < 2:
        raise OptiflowError(f"csv file {file} needs a header row and at least one data row")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    if target not in header:
        raise OptiflowError(f"csv file {file} has no column '{target}'; its columns are: {', '.join(header)}")
    twice = repeated(header)
    if twice is not None:
        raise OptiflowError(f"csv file {file}: column '{twice}' appears twice in the header")
    if len(header) < 2:
        raise OptiflowError(f"csv file {file} has no feature columns besides the target '{target}'")
    column = header.index(target)
    features, labels = [], []
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise OptiflowError(f"csv file {file}, line {line}: {len(row)} values for {len(header)} columns")
        try:
            features.append([float(v) for i, v in enumerate(row) if i != column])
        except ValueError:
            bad = next(i for i, v in enumerate(row) if i != column and not is_number(v))
            raise OptiflowError(
                f"csv file {file}, line {line}: column '{header[bad]}' holds {row[bad]!r}, not a number"
            ) from None
        labels.append(row[column].strip())
    _refuse_empty_targets(file, target, labels)
    names = [name for i, name in enumerate(header) if i != column]
    x = _float32(file, features, names)
    numeric = all(is_number(v) for v in labels)
    if task == "auto":
        integral = numeric and all(float(v).is_integer() for v in labels)
        task = "classification" if not numeric or (integral and len(set(labels)) <= 20) else "regression"
    if task == "regression":
        if not numeric:
            raise OptiflowError(f"csv file {file}: target column '{target}' is not numeric, so it cannot be regressed")
        return DataSource(x, torch.tensor([float(v) for v in labels]), "regression", meta={"path": str(file)},
                          feature_names=names, target=target)
    classes = sorted(set(labels), key=lambda v: (float(v), v) if numeric else (0.0, v))
    index = {label: i for i, label in enumerate(classes)}
    y = torch.tensor([index[v] for v in labels], dtype=torch.long)
    return DataSource(x, y, "classification", num_classes=len(classes), classes=classes, meta={"path": str(file)},
                      feature_names=names, target=target)


def _float32(file: Path, features: list[list[float]], names: list[str]):
    """The feature rows as a float32 tensor; a value too large for float32 (it would become inf) refused with its line."""
    import numpy as np
    import torch

    values = np.array(features, dtype=np.float64).reshape(len(features), len(names))
    over = beyond_float32(values)
    if over.any():
        row, col = (int(i) for i in np.argwhere(over)[0])
        raise OptiflowError(f"csv file {file}, line {row + 2}: column '{names[col]}' holds {values[row, col]:g}, "
                            "beyond the range of float32 numbers a model computes in (+-3.4e38)")
    return torch.from_numpy(values.astype(np.float32))


def _refuse_empty_targets(file: Path, target: str, labels: list[str]) -> None:
    """An empty target cell is a missing label, not a class named ''."""
    empty = [line for line, label in enumerate(labels, start=2) if not label]
    if empty:
        shown = ", ".join(map(str, empty[:5])) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise OptiflowError(f"csv file {file}: target column '{target}' is empty on line{'s' if len(empty) > 1 else ''} "
                            f"{shown}; fill in those labels or drop the rows")


def image_folder(ctx: DataContext, *, path: str = "", size: int = 32, grayscale: bool = False) -> DataSource:
    """Images in one sub-folder per class (torchvision ImageFolder), resized to size x size."""
    import torch
    from torchvision import datasets

    folder = _user_path(ctx, "image-folder", path)
    if size < 1:
        raise OptiflowError(f"image-folder: size must be >= 1, got {size}")
    try:
        dataset = datasets.ImageFolder(str(folder), transform=image_transform(size, size, grayscale=grayscale),
                                       loader=open_image)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise OptiflowError(f"image-folder {folder}: {first_line(exc)}") from None
    images = [dataset[i][0] for i in range(len(dataset))]
    y = torch.tensor(dataset.targets, dtype=torch.long)
    return DataSource(torch.stack(images), y, "classification", num_classes=len(dataset.classes),
                      classes=list(dataset.classes), meta={"path": str(folder)})


def _user_path(ctx: DataContext, name: str, path: str) -> Path:
    """``path`` as given, or under ``--data-dir``; a clear error when it is missing."""
    if not path:
        raise OptiflowError(f"dataset '{name}' needs a path, e.g. --data {name}:path=my_data")
    candidates = [Path(path).expanduser(), Path(ctx.data_dir) / path]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise OptiflowError(f"dataset '{name}': {path} not found (also looked in {ctx.data_dir})")


DATASETS = {
    "digits": digits,
    "iris": iris,
    "wine": wine,
    "breast-cancer": breast_cancer,
    "diabetes": diabetes,
    "linear": linear,
    "sine": sine,
    "cubic": cubic,
    "mnist": mnist,
    "fashion-mnist": fashion_mnist,
    "cifar10": cifar10,
    "csv": csv,
    "image-folder": image_folder,
}
