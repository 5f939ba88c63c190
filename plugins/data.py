"""Datasets, normalizers and augmentations.

Datasets: scikit-learn's bundled sets (no download), the classic synthetic
regression problems (seeded by ``--seed``), torchvision's MNIST, Fashion-MNIST
and CIFAR-10 read from ``--data-dir`` in their standard on-disk layout, and a
user's own CSV file or folder of images.  Normalizers are fitted on the
training split only; augmentations are torchvision transforms applied to each
training sample.
"""

from __future__ import annotations

import csv as csv_module
from pathlib import Path
from typing import Literal

from optiflow import hookimpl
from optiflow.data import DataContext, DataSource
from optiflow.errors import OptiflowError


@hookimpl
def optiflow_register_data(register):
    for name, factory in DATASETS.items():
        register(name, factory)
    for name, factory in NORMALIZERS.items():
        register(name, factory, kind="normalizer")
    for name, factory in AUGMENTATIONS.items():
        register(name, factory, kind="augmentation")


# --- scikit-learn's bundled datasets -------------------------------------------------------------


def digits(ctx: DataContext, *, image: bool = False) -> DataSource:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 samples, 10 classes); image=true gives 1x8x8 images."""
    import torch
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    if image:
        x = x.reshape(-1, 1, 8, 8)
    y = torch.tensor(bunch.target, dtype=torch.long)
    return DataSource(x, y, "classification", num_classes=10, classes=[str(c) for c in bunch.target_names])


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
    return DataSource(x, y, "regression", meta={"target_scale": target_scale})


def _sklearn_classification(loader: str) -> DataSource:
    import sklearn.datasets
    import torch

    bunch = getattr(sklearn.datasets, loader)()
    x = torch.tensor(bunch.data, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.long)
    return DataSource(x, y, "classification", num_classes=len(bunch.target_names),
                      classes=[str(c) for c in bunch.target_names])


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

    if n < 10:
        raise OptiflowError(f"synthetic datasets need n >= 10 samples, got {n}")
    if noise < 0:
        raise OptiflowError(f"noise must be >= 0, got {noise}")
    generator = torch.Generator().manual_seed(ctx.seed)
    low, high = interval
    x = torch.rand(n, 1, generator=generator) * (high - low) + low
    y = function(x).squeeze(1) + noise * torch.randn(n, generator=generator)
    return DataSource(x, y, "regression", meta={"noise": noise})


# --- torchvision image datasets ------------------------------------------------------------------


def mnist(ctx: DataContext, *, subset: int = 0, download: bool = True) -> DataSource:
    """MNIST handwritten digits (60k/10k 1x28x28) from <data-dir>/MNIST/raw; downloaded when missing."""
    return _torchvision_dataset(ctx, "MNIST", subset, download)


def fashion_mnist(ctx: DataContext, *, subset: int = 0, download: bool = True) -> DataSource:
    """Fashion-MNIST clothing images (60k/10k 1x28x28) from <data-dir>/FashionMNIST/raw; downloaded when missing."""
    return _torchvision_dataset(ctx, "FashionMNIST", subset, download)


def cifar10(ctx: DataContext, *, subset: int = 0, download: bool = True) -> DataSource:
    """CIFAR-10 (50k/10k 3x32x32, 10 classes) from <data-dir>/cifar-10-batches-py; downloaded when missing."""
    return _torchvision_dataset(ctx, "CIFAR10", subset, download)


def _torchvision_dataset(ctx: DataContext, class_name: str, subset: int, download: bool) -> DataSource:
    """Train and test sets through torchvision's own dataset class; ``subset`` > 0 keeps that many training samples."""
    import torch

    if subset < 0:
        raise OptiflowError(f"subset must be >= 0 (0 keeps every sample), got {subset}")
    dataset_class = _dataset_class(class_name)
    root = Path(ctx.data_dir)
    location = root / (class_name + "/raw" if class_name != "CIFAR10" else "cifar-10-batches-py")
    if class_name != "CIFAR10":
        _gunzip_missing(dataset_class, location)
    train, test = _open(dataset_class, root, location, download)
    x, y = _images(train), torch.as_tensor(train.targets, dtype=torch.long)
    if subset and subset < len(x):
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(ctx.seed))[:subset]
        x, y = x[keep], y[keep]
    return DataSource(x, y, "classification", num_classes=len(train.classes), classes=list(train.classes),
                      x_test=_images(test), y_test=torch.as_tensor(test.targets, dtype=torch.long),
                      meta={"root": str(location)})


def _dataset_class(class_name: str):
    from torchvision import datasets

    if class_name != "CIFAR10":
        return getattr(datasets, class_name)

    class CIFAR10(datasets.CIFAR10):
        """torchvision's CIFAR-10 that asks only that the batch files exist (their checksums are checked on download)."""

        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            import pickle

            path = Path(self.root) / self.base_folder / self.meta["filename"]
            if not path.is_file():
                raise RuntimeError(f"Dataset metadata file {path} not found")
            with open(path, "rb") as handle:
                self.classes = pickle.load(handle, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    return CIFAR10


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
    import contextlib
    import sys

    name = dataset_class.__name__
    try:
        return dataset_class(root, train=True), dataset_class(root, train=False)
    except RuntimeError:
        if not download:
            raise OptiflowError(
                f"{name} files not found in {location}; copy them there or allow the download (download=true)"
            ) from None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return dataset_class(root, train=True, download=True), dataset_class(root, train=False)
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


def _images(dataset):
    """A torchvision dataset's images as one uint8 tensor shaped (N, C, H, W)."""
    import torch

    data = torch.as_tensor(dataset.data)
    return data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2).contiguous()


# --- the user's own files ------------------------------------------------------------------------


def csv(ctx: DataContext, *, path: str = "", target: str = "target",
        task: Literal["auto", "classification", "regression"] = "auto", delimiter: str = ",") -> DataSource:
    """A CSV file with a header row: numeric feature columns and the `target` column (auto: text or <= 20 integer values -> classes)."""
    import torch

    file = _user_path(ctx, "csv", path)
    with open(file, newline="") as handle:
        rows = [row for row in csv_module.reader(handle, delimiter=delimiter) if row]
    if len(rows) < 2:
        raise OptiflowError(f"csv file {file} needs a header row and at least one data row")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    if target not in header:
        raise OptiflowError(f"csv file {file} has no column '{target}'; its columns are: {', '.join(header)}")
    column = header.index(target)
    features, labels = [], []
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise OptiflowError(f"csv file {file}, line {line}: {len(row)} values for {len(header)} columns")
        try:
            features.append([float(v) for i, v in enumerate(row) if i != column])
        except ValueError:
            bad = next(i for i, v in enumerate(row) if i != column and not _is_number(v))
            raise OptiflowError(
                f"csv file {file}, line {line}: column '{header[bad]}' holds {row[bad]!r}, not a number"
            ) from None
        labels.append(row[column].strip())
    x = torch.tensor(features, dtype=torch.float32)
    numeric = all(_is_number(v) for v in labels)
    if task == "auto":
        integral = numeric and all(float(v).is_integer() for v in labels)
        task = "classification" if not numeric or (integral and len(set(labels)) <= 20) else "regression"
    if task == "regression":
        if not numeric:
            raise OptiflowError(f"csv file {file}: target column '{target}' is not numeric, so it cannot be regressed")
        return DataSource(x, torch.tensor([float(v) for v in labels]), "regression", meta={"path": str(file)})
    classes = sorted(set(labels), key=lambda v: (float(v), v) if numeric else (0.0, v))
    index = {label: i for i, label in enumerate(classes)}
    y = torch.tensor([index[v] for v in labels], dtype=torch.long)
    return DataSource(x, y, "classification", num_classes=len(classes), classes=classes, meta={"path": str(file)})


def image_folder(ctx: DataContext, *, path: str = "", size: int = 32, grayscale: bool = False) -> DataSource:
    """Images in one sub-folder per class (torchvision ImageFolder), resized to size x size."""
    import torch
    from torchvision import datasets
    from torchvision.transforms import v2

    folder = _user_path(ctx, "image-folder", path)
    if size < 1:
        raise OptiflowError(f"image-folder: size must be >= 1, got {size}")
    steps = [v2.PILToTensor(), v2.Resize((size, size), antialias=True)]
    if grayscale:
        steps.append(v2.Grayscale(1))
    try:
        dataset = datasets.ImageFolder(str(folder), transform=v2.Compose(steps))
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise OptiflowError(f"image-folder {folder}: {str(exc).splitlines()[0]}") from None
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


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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


# --- normalizers (fitted on the training split only) ---------------------------------------------


class NoNormalization:
    """Leave features as they are."""

    def fit(self, x):
        return self

    def transform(self, x):
        return x

    def state(self):
        return {}


class Standardize:
    """Zero mean, unit variance per feature (per pixel for images), fitted on the training split."""

    def __init__(self, *, eps: float = 1e-8) -> None:
        self.eps = eps
        self.mean = self.std = None

    def reduce_dims(self, x) -> list[int]:
        return [0]

    def fit(self, x):
        dims = self.reduce_dims(x)
        self.mean = x.mean(dim=dims, keepdim=True)
        std = x.std(dim=dims, keepdim=True) if len(x) > 1 else x.new_ones(self.mean.shape)
        self.std = std.masked_fill(std < self.eps, 1.0)
        return self

    def transform(self, x):
        return (x - self.mean) / self.std

    def state(self):
        return {"mean": self.mean.flatten(), "std": self.std.flatten()}


class PerChannel(Standardize):
    """Per-channel mean/std for images (N, C, H, W), fitted on the training split unless mean and std are given."""

    def __init__(self, *, mean: tuple[float, ...] = (), std: tuple[float, ...] = (), eps: float = 1e-8) -> None:
        super().__init__(eps=eps)
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise OptiflowError("per-channel: give mean and std together, one positive std per channel")
        self.fixed = (mean, std) if mean else None

    def reduce_dims(self, x) -> list[int]:
        if x.ndim != 4:
            raise OptiflowError(
                f"per-channel normalization needs images (N, C, H, W), got shape {list(x.shape)}; use standard"
            )
        return [0, 2, 3]

    def fit(self, x):
        if self.fixed is None:
            return super().fit(x)
        self.reduce_dims(x)
        mean, std = (x.new_tensor(values).reshape(1, -1, 1, 1) for values in self.fixed)
        if mean.shape[1] != x.shape[1]:
            raise OptiflowError(f"per-channel: {mean.shape[1]} mean values for images with {x.shape[1]} channels")
        self.mean, self.std = mean, std
        return self


class MinMax:
    """Rescale each feature linearly to [low, high] using the training split's min and max."""

    def __init__(self, low: float = 0.0, high: float = 1.0) -> None:
        self.low, self.high = low, high
        self.min = self.range = None

    def fit(self, x):
        self.min = x.amin(dim=0, keepdim=True)
        span = x.amax(dim=0, keepdim=True) - self.min
        self.range = span.masked_fill(span <= 0, 1.0)
        return self

    def transform(self, x):
        return self.low + (x - self.min) / self.range * (self.high - self.low)

    def state(self):
        return {"min": self.min.flatten(), "max": (self.min + self.range).flatten(), "low": self.low, "high": self.high}


def minmax():
    """Rescale each feature to [0, 1] with the training split's min and max."""
    return MinMax(0.0, 1.0)


def scale():
    """Rescale each feature to [-1, 1] with the training split's min and max."""
    return MinMax(-1.0, 1.0)


class PCA:
    """Project flattened inputs on the training split's top principal components (optionally whitened)."""

    def __init__(self, n_components: float | None, whiten: bool, eps: float) -> None:
        if n_components is not None and (n_components <= 0 or (n_components >= 1 and not n_components.is_integer())):
            raise OptiflowError(
                f"n_components must be a whole number of components or a variance fraction in (0, 1), got {n_components}"
            )
        self.n_components, self.whiten, self.eps = n_components, whiten, eps
        self.mean = self.components = self.variance = None
        self.ratio = 0.0

    def fit(self, x):
        import torch

        flat = x.flatten(1).double()
        self.mean = flat.mean(dim=0)
        centered = flat - self.mean
        covariance = centered.T @ centered / max(1, len(flat) - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
        total = eigenvalues.sum().clamp_min(1e-300)
        k = self._count(eigenvalues, total)
        self.components = eigenvectors[:, :k].T.contiguous()
        self.variance = eigenvalues[:k]
        self.ratio = float(self.variance.sum() / total)
        return self

    def _count(self, eigenvalues, total) -> int:
        useful = int((eigenvalues > eigenvalues[0] * 1e-10).sum()) or 1
        if self.n_components is None:
            return useful
        if self.n_components < 1:
            cumulative = eigenvalues.cumsum(0) / total
            return min(useful, int((cumulative < self.n_components).sum()) + 1)
        return min(int(self.n_components), len(eigenvalues))

    def transform(self, x):
        projected = (x.flatten(1).double() - self.mean) @ self.components.T
        if self.whiten:
            projected = projected / (self.variance + self.eps).sqrt()
        return projected.float()

    def state(self):
        return {"n_components": len(self.components), "explained_variance_ratio": self.ratio, "whiten": self.whiten,
                "mean": self.mean, "components": self.components, "explained_variance": self.variance}


def pca(*, n_components: float | None = 0.95):
    """PCA on flattened inputs: keep n_components components (or, below 1, that fraction of the variance)."""
    return PCA(n_components, whiten=False, eps=0.0)


def whiten(*, n_components: float | None = None, eps: float = 1e-5):
    """PCA whitening: decorrelated components scaled to unit variance (all non-degenerate ones by default)."""
    return PCA(n_components, whiten=True, eps=eps)


NORMALIZERS = {
    "none": NoNormalization,
    "minmax": minmax,
    "scale": scale,
    "standard": Standardize,
    "per-channel": PerChannel,
    "pca": pca,
    "whiten": whiten,
}


# --- augmentations (torchvision transforms, training samples only) -------------------------------


class ImageTransform:
    """One torchvision transform applied to a single CHW image tensor; rejects non-image inputs clearly."""

    def __init__(self, name: str, transform) -> None:
        self.name, self.transform = name, transform

    def __call__(self, sample):
        if sample.ndim != 3:
            raise OptiflowError(
                f"augmentation '{self.name}' needs image inputs (C, H, W), got a sample of shape {list(sample.shape)}"
            )
        return self.transform(sample)


def hflip(*, p: float = 0.5):
    """Flip the image left-right with probability p."""
    from torchvision.transforms import v2

    return ImageTransform("hflip", v2.RandomHorizontalFlip(_probability(p)))


def vflip(*, p: float = 0.5):
    """Flip the image upside down with probability p."""
    from torchvision.transforms import v2

    return ImageTransform("vflip", v2.RandomVerticalFlip(_probability(p)))


def rotation(*, degrees: float = 15.0):
    """Rotate by an angle drawn uniformly from [-degrees, degrees] (corners filled with 0)."""
    from torchvision.transforms import v2

    if degrees < 0:
        raise OptiflowError(f"rotation: degrees must be >= 0, got {degrees}")
    return ImageTransform("rotation", v2.RandomRotation(degrees))


class RandomCrop:
    """Pad by ``padding`` on every side, then crop back to the image's own size at a random offset."""

    def __init__(self, padding: int, mode: str) -> None:
        self.padding, self.mode = padding, mode
        self.crops: dict = {}

    def __call__(self, sample):
        from torchvision.transforms import v2

        size = tuple(sample.shape[-2:])
        if size not in self.crops:
            self.crops[size] = v2.RandomCrop(size, padding=self.padding, padding_mode=self.mode)
        return self.crops[size](sample)


def random_crop(*, padding: int = 4, mode: Literal["constant", "edge", "reflect", "symmetric"] = "constant"):
    """Pad each side by padding pixels and crop back to the original size at a random position."""
    if padding < 0:
        raise OptiflowError(f"random-crop: padding must be >= 0, got {padding}")
    return ImageTransform("random-crop", RandomCrop(padding, mode))


class OnUnitRange:
    """Apply ``transform`` (which expects values in [0, 1]) to a sample mapped there by its own min and max."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, sample):
        low, high = sample.min(), sample.max()
        span = (high - low).clamp_min(1e-12)
        return self.transform((sample - low) / span) * span + low


def color_jitter(*, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2, hue: float = 0.0):
    """Random brightness, contrast, saturation and hue changes (saturation and hue need colour images)."""
    from torchvision.transforms import v2

    try:
        jitter = v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
    except ValueError as exc:
        raise OptiflowError(f"color-jitter: {exc}") from None
    return ImageTransform("color-jitter", OnUnitRange(jitter))


def random_erasing(*, p: float = 0.5, scale: tuple[float, ...] = (0.02, 0.33), ratio: tuple[float, ...] = (0.3, 3.3),
                   value: float = 0.0):
    """Erase a random rectangle (area fraction in scale, aspect ratio in ratio) with probability p (Zhong et al. 2017)."""
    from torchvision.transforms import v2

    if len(scale) != 2 or len(ratio) != 2:
        raise OptiflowError("random-erasing: scale and ratio take two numbers each, e.g. scale=[0.02,0.33]")
    try:
        eraser = v2.RandomErasing(p=_probability(p), scale=tuple(scale), ratio=tuple(ratio), value=value)
    except ValueError as exc:
        raise OptiflowError(f"random-erasing: {exc}") from None
    return ImageTransform("random-erasing", eraser)


def _probability(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise OptiflowError(f"probability p must be in [0, 1], got {p}")
    return p


AUGMENTATIONS = {
    "hflip": hflip,
    "vflip": vflip,
    "rotation": rotation,
    "random-crop": random_crop,
    "color-jitter": color_jitter,
    "random-erasing": random_erasing,
}
