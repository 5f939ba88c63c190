"""What dataset plugins return, and how the core splits, normalizes and batches it."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from optiflow.errors import OptiflowError
from optiflow.holdout import kfold_split, shuffle_split
from optiflow.sizing import first_non_finite

if TYPE_CHECKING:
    import torch
    from torch import Tensor

Task = Literal["classification", "regression"]
T = TypeVar("T")


@dataclass(frozen=True)
class DataContext:
    """What a dataset factory is told about the run: where files live and the seed."""

    data_dir: Path  #: where file-based datasets live (``--data-dir``)
    seed: int  #: the run's seed
    download: bool = False  #: whether a missing dataset may be downloaded


@dataclass
class DataSource:
    """Features and targets from a dataset plugin, with its own test split if it has one.

    ``x`` holds the values as the dataset's own source gives them ("raw"), shaped
    ``(N, *input_shape)``; the core divides them by ``raw_scale`` (uint8 images: 255 unless
    given; digits' 0..16 pixels: 16) and trains on the result, and the logged model takes
    raw values and divides them itself.  ``y`` is int64 class indices for classification or
    float32 ``(N,)``/``(N, k)`` for regression.  The samples are images
    (``image``: ``x`` shaped ``(N, C, H, W)``; the default when ``x`` has 4 dimensions)
    or feature vectors, named by ``feature_names`` when they have names; ``target``
    names what ``y`` holds, and regression targets are ``y * target_scale`` in their
    original units.  Values sharing one unit (images, and anything given a ``raw_scale``:
    pixels) have one range; other features each have their own (see :func:`value_range`).
    """

    x: Tensor
    y: Tensor
    task: Task
    num_classes: int | None = None
    x_test: Tensor | None = None
    y_test: Tensor | None = None
    classes: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    image: bool | None = None
    feature_names: list[str] | None = None
    target: str | None = None
    target_scale: float = 1.0
    raw_scale: float | None = None

    def __post_init__(self) -> None:
        import torch

        self.y = torch.as_tensor(self.y)
        if self.raw_scale is None:
            self.raw_scale = 255.0 if torch.as_tensor(self.x).dtype == torch.uint8 else 1.0
        if not (math.isfinite(self.raw_scale) and self.raw_scale > 0):
            raise OptiflowError(f"raw_scale must be a finite number > 0, got {self.raw_scale}")
        self.x = _as_float(self.x, self.raw_scale)
        if self.x_test is not None:
            self.x_test = _as_float(self.x_test, self.raw_scale)
        if self.task == "classification" and self.num_classes is None:
            self.num_classes = int(self.y.max().item()) + 1
        if self.image is None:
            self.image = self.x.ndim == 4
        elif self.image and self.x.ndim != 4:
            raise OptiflowError(f"a dataset of images gives x shaped (N, C, H, W), got {list(self.x.shape)}")
        if self.feature_names is not None and len(self.feature_names) != math.prod(self.input_shape):
            raise OptiflowError(f"{len(self.feature_names)} feature names for samples of shape {list(self.input_shape)}")
        self._check_values()

    def _check_values(self) -> None:
        """Refuse non-finite inputs or targets (naming the sample and column) and classification with one class."""

        for name, tensor in (("training", self.x), ("test", self.x_test), ("target of the training", self.y)):
            if tensor is None or not tensor.is_floating_point():
                continue
            bad = first_non_finite(tensor.reshape(len(tensor), -1))
            if bad is not None:
                sample, column = bad
                names = self.feature_names if name != "target of the training" else [self.target or "target"]
                where = f", column '{names[column]}'" if names and column < len(names) else ""
                value = tensor.reshape(len(tensor), -1)[sample, column].item()
                raise OptiflowError(f"the {name} data holds {value} in sample {sample}{where}; "
                                    "every value must be a finite number")
        if self.task == "classification" and len(self.y) and int(self.y.unique().numel()) < 2:
            only = self.classes[int(self.y[0])] if self.classes else str(int(self.y[0]))
            raise OptiflowError(f"every sample is of the one class '{only}'; classification needs at least 2 classes")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape: ``(features,)`` or ``(C, H, W)``."""
        return tuple(self.x.shape[1:])

    @property
    def shared_range(self) -> bool:
        """Whether every value is in one unit (pixels), so one range covers them all."""
        return bool(self.image) or self.raw_scale != 1.0

    @property
    def num_outputs(self) -> int:
        """What the model outputs per sample: the classes, or the regression targets."""
        if self.task == "classification":
            return int(self.num_classes or 0)
        return 1 if self.y.ndim == 1 else int(self.y.shape[1])


@dataclass
class Splits:
    """Train, validation and test tensors; validation may be empty."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    def to(self, device: torch.device, train_device: torch.device | None = None) -> Splits:
        """Every split on ``device``, except the training split on ``train_device`` when given."""
        train_device = train_device or device
        x_train, y_train, *rest = self.tensors()
        return Splits(x_train.to(train_device), y_train.to(train_device), *(t.to(device) for t in rest))

    def tensors(self) -> tuple[Tensor, ...]:
        """``(x_train, y_train, x_val, y_val, x_test, y_test)``."""
        return (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test)

    def sizes(self) -> dict[str, int]:
        """Samples per split: ``{"train": ..., "val": ..., "test": ...}``."""
        return {"train": len(self.x_train), "val": len(self.x_val), "test": len(self.x_test)}


class Normalizer(Protocol):
    """Fitted on the training split only, then applied to every split.

    A normalizer that also has ``module() -> nn.Module`` (the fitted transform, its statistics
    as buffers) becomes part of the logged model, which then takes raw inputs.
    """

    def fit(self, x: Tensor) -> Normalizer: ...

    def transform(self, x: Tensor) -> Tensor: ...

    def state(self) -> dict[str, Any]: ...


SEEDS = 2**32  #: NumPy's seeds are below this: a salted seed wraps around (--seed 4294967295 is one like any other)


def split(source: DataSource, val_split: float, test_split: float, seed: int, *, cv_folds: int = 0,
          cv_fold: int = 0) -> Splits:
    """Seeded, stratified (for classification) train/validation/test split.

    With ``cv_folds`` K >= 2 the validation set is fold ``cv_fold`` of a seeded K-fold
    partition of everything outside the test set (``val_split`` is then unused).
    """
    import torch

    def cut(x: Tensor, y: Tensor, fraction: float, salt: int) -> tuple[Tensor, ...]:
        if fraction <= 0:
            return x, y, x[:0], y[:0]
        if len(x) - math.ceil(fraction * len(x)) < 1:
            part = "test" if salt == 0 else "validation"
            raise OptiflowError(f"{len(x)} samples are too few to hold out a {part} split of {fraction:g} "
                                "and keep any for training; give more data")

        def indices() -> tuple[Tensor, Tensor]:
            stratify, salted = (y.numpy() if source.task == "classification" else None), (seed + salt) % SEEDS
            try:
                index_a, index_b = shuffle_split(len(x), fraction, salted, stratify)
            except ValueError:  # too few samples of some class to stratify
                index_a, index_b = shuffle_split(len(x), fraction, salted)
            return torch.as_tensor(index_a), torch.as_tensor(index_b)

        a, b = _remembered(source, ("cut", test_split, fraction, seed, salt), indices)
        return x[a], y[a], x[b], y[b]

    if source.x_test is not None and source.y_test is not None:
        x_rest, y_rest, x_test, y_test = source.x, source.y, source.x_test, source.y_test
    else:
        x_rest, y_rest, x_test, y_test = cut(source.x, source.y, test_split, salt=0)
    if cv_folds:
        def partition() -> list[tuple[Tensor, Tensor]]:
            classes = y_rest.numpy() if source.task == "classification" else None
            try:
                parts = kfold_split(len(x_rest), cv_folds, (seed + 1) % SEEDS, classes)  # as (Stratified)KFold
                return [(torch.as_tensor(a), torch.as_tensor(b)) for a, b in parts]
            except ValueError as exc:
                raise OptiflowError(f"cannot make {cv_folds} cross-validation folds: {exc}") from None

        train_index, val_index = _remembered(source, ("folds", test_split, seed, cv_folds), partition)[cv_fold]
        x_train, y_train, x_val, y_val = x_rest[train_index], y_rest[train_index], x_rest[val_index], y_rest[val_index]
    else:
        x_train, y_train, x_val, y_val = cut(x_rest, y_rest, val_split, salt=1)
    if len(x_train) == 0:
        raise OptiflowError("the training split is empty: use a smaller --val-split or more data")
    return Splits(x_train, y_train, x_val, y_val, x_test, y_test)


_SPLITS: dict[int, tuple[weakref.ref[DataSource], dict[tuple[object, ...], Any]]] = {}


def _remembered(source: DataSource, key: tuple[object, ...], compute: Callable[[], T]) -> T:
    """``compute()`` once per loaded source and key: the folds and trials of a search share one source
    (``run.shared_data``) and split it alike, every fold by the same seeded partition."""
    entry = _SPLITS.get(id(source))
    if entry is None or entry[0]() is not source:
        for stale in [k for k, (ref, _) in _SPLITS.items() if ref() is None]:
            del _SPLITS[stale]
        entry = _SPLITS[id(source)] = (weakref.ref(source), {})
    if key not in entry[1]:
        entry[1][key] = compute()
    return entry[1][key]


def normalize(splits: Splits, normalizer: Normalizer) -> Splits:
    """Fit ``normalizer`` on the training features only and transform every split."""
    normalizer.fit(splits.x_train)
    return Splits(
        normalizer.transform(splits.x_train),
        splits.y_train,
        normalizer.transform(splits.x_val),
        splits.y_val,
        normalizer.transform(splits.x_test),
        splits.y_test,
    )


class TensorBatches:
    """Mini-batches from tensors already on the training device, by index permutation.

    No per-sample work and no host round trip: the fast path for data that fits
    in memory.  With ``world_size > 1`` each rank takes every ``world_size``-th
    index of the same seeded permutation (padded so that all ranks see as many
    batches), like ``DistributedSampler``.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.x, self.y = x, y
        self.rank, self.world_size = rank, world_size
        self.shard_size = math.ceil(len(x) / world_size)
        self.batch_size = max(1, min(batch_size, self.shard_size))
        self.shuffle, self.drop_last = shuffle, drop_last
        self.generator = generator

    def __len__(self) -> int:
        n = self.shard_size / self.batch_size
        return max(1, math.floor(n)) if self.drop_last else math.ceil(n)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.order()
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.x[index], self.y[index]

    def order(self) -> Tensor:
        """The next epoch's sample order (drawn from the generator when shuffling), this rank's share of it."""
        import torch

        n = len(self.x)
        order = torch.randperm(n, generator=self.generator).to(self.x.device) if self.shuffle \
            else torch.arange(n, device=self.x.device)
        if self.world_size > 1:
            order = torch.cat([order, order[: self.shard_size * self.world_size - n]])[self.rank :: self.world_size]
        return order


class LoaderBatches:
    """Mini-batches through a ``DataLoader``: per-sample augmentation (in ``workers``
    processes), optional pinned memory, and non-blocking copies to ``device``.

    The path for augmented data or data kept on the host; shards by rank with
    ``DistributedSampler`` when ``world_size > 1``.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        device: torch.device,
        shuffle: bool = True,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
        workers: int = 0,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        from torch.utils.data import DataLoader, DistributedSampler

        dataset: Any = _SampleDataset(x.cpu(), y.cpu(), transform)  # a map-style Dataset, without importing torch here
        self.sampler: DistributedSampler[int] | None = None
        if world_size > 1:
            seed = generator.initial_seed() if generator is not None else 0
            self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                              seed=seed, drop_last=False)
        self.device = device
        self.non_blocking = pin_memory and device.type == "cuda"
        shard = len(dataset) if self.sampler is None else self.sampler.num_samples
        self.loader: DataLoader[tuple[Tensor, Tensor]] = DataLoader(
            dataset,
            batch_size=max(1, min(batch_size, shard)),
            shuffle=shuffle if self.sampler is None else False,
            sampler=self.sampler,
            drop_last=drop_last and shard >= batch_size,
            generator=generator,
            num_workers=workers,
            pin_memory=self.non_blocking,
            persistent_workers=workers > 0,
        )
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        for xb, yb in self.loader:
            yield xb.to(self.device, non_blocking=self.non_blocking), yb.to(self.device, non_blocking=self.non_blocking)


class _SampleDataset:
    """Indexable (x, y) pairs with an optional per-sample transform of x."""

    def __init__(self, x: Tensor, y: Tensor, transform: Callable[[Tensor], Tensor] | None) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        sample = self.x[index]
        return (sample if self.transform is None else self.transform(sample)), self.y[index]


def value_range(source: DataSource, x_train: Tensor) -> tuple[list[float], list[float]]:
    """The raw values seen in training (``x_train``, as the core scaled it): one (low, high) pair
    for values sharing one unit, else one per feature; in the source's own units."""
    flat = x_train.detach().reshape(len(x_train), -1)
    if source.shared_range:
        flat = flat.reshape(-1, 1)
    if not len(flat):
        return [], []
    scale = float(source.raw_scale or 1.0)
    low, high = (flat.amin(0).double() * scale).tolist(), (flat.amax(0).double() * scale).tolist()
    return [float(f"{v:.6g}") for v in low], [float(f"{v:.6g}") for v in high]


def _as_float(x: Tensor, scale: float = 1.0) -> Tensor:
    """``x`` as float32 on the scale the core trains on: raw values divided by ``scale`` (in place when the
    float copy is this function's own: one copy of 60,000 images, not two)."""
    import torch

    given = torch.as_tensor(x)
    x = given.float() if not torch.is_floating_point(given) or given.dtype == torch.float64 else given
    if scale == 1.0:
        return x
    return x.div_(scale) if x is not given else x / scale


def image_transform(height: int, width: int, *, grayscale: bool) -> Callable[[object], Tensor]:
    """How an RGB PIL image becomes a sample: a uint8 tensor, resized (antialiased), optionally grayscale.

    The ``image-folder`` dataset and ``optiflow predict`` both use it, so predicted images are
    prepared exactly as the training images were."""
    from torchvision.transforms import v2

    steps = [v2.PILToTensor(), v2.Resize((height, width), antialias=True)]
    if grayscale:
        steps.append(v2.Grayscale(1))
    return v2.Compose(steps)
