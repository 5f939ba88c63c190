"""What dataset plugins return, and how the core splits, normalizes and batches it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Protocol

from optiflow.errors import OptiflowError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

Task = Literal["classification", "regression"]


@dataclass(frozen=True)
class DataContext:
    """What a dataset factory is told about the run: where files live and the seed."""

    data_dir: Path
    seed: int
    download: bool = False


@dataclass
class DataSource:
    """Features and targets from a dataset plugin, with its own test split if it has one.

    ``x`` is float32 (or uint8 images, scaled to [0, 1] by the core) shaped
    ``(N, *input_shape)``; ``y`` is int64 class indices for classification or
    float32 ``(N,)``/``(N, k)`` for regression.
    """

    x: Tensor
    y: Tensor
    task: Task
    num_classes: int | None = None
    x_test: Tensor | None = None
    y_test: Tensor | None = None
    classes: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import torch

        self.y = torch.as_tensor(self.y)
        self.x = _as_float(self.x)
        if self.x_test is not None:
            self.x_test = _as_float(self.x_test)
        if self.task == "classification" and self.num_classes is None:
            self.num_classes = int(self.y.max().item()) + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def num_outputs(self) -> int:
        if self.task == "classification":
            return int(self.num_classes)
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

    def to(self, device: torch.device) -> "Splits":
        return Splits(*(t.to(device) for t in self.tensors()))

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.x_train), "val": len(self.x_val), "test": len(self.x_test)}


class Normalizer(Protocol):
    """Fitted on the training split only, then applied to every split."""

    def fit(self, x: Tensor) -> "Normalizer": ...

    def transform(self, x: Tensor) -> Tensor: ...

    def state(self) -> dict[str, Any]: ...


def split(source: DataSource, val_split: float, test_split: float, seed: int) -> Splits:
    """Seeded, stratified (for classification) train/validation/test split."""
    import torch
    from sklearn.model_selection import train_test_split

    def cut(x: Tensor, y: Tensor, fraction: float, salt: int) -> tuple[Tensor, ...]:
        if fraction <= 0:
            return x, y, x[:0], y[:0]
        stratify = y.numpy() if source.task == "classification" else None
        try:
            index_a, index_b = train_test_split(
                torch.arange(len(x)).numpy(), test_size=fraction, random_state=seed + salt, stratify=stratify
            )
        except ValueError:  # too few samples of some class to stratify
            index_a, index_b = train_test_split(
                torch.arange(len(x)).numpy(), test_size=fraction, random_state=seed + salt
            )
        a, b = torch.as_tensor(index_a), torch.as_tensor(index_b)
        return x[a], y[a], x[b], y[b]

    if source.x_test is not None:
        x_rest, y_rest, x_test, y_test = source.x, source.y, source.x_test, source.y_test
    else:
        x_rest, y_rest, x_test, y_test = cut(source.x, source.y, test_split, salt=0)
    x_train, y_train, x_val, y_val = cut(x_rest, y_rest, val_split, salt=1)
    if len(x_train) == 0:
        raise OptiflowError("the training split is empty: use a smaller --val-split or more data")
    return Splits(x_train, y_train, x_val, y_val, x_test, y_test)


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

    With ``transform`` (augmentation) each training sample is transformed on
    its own before batching; otherwise no per-sample work is done at all.
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
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.x, self.y = x, y
        self.batch_size = max(1, min(batch_size, len(x)))
        self.shuffle, self.drop_last = shuffle, drop_last
        self.generator, self.transform = generator, transform

    def __len__(self) -> int:
        n = len(self.x) / self.batch_size
        return max(1, math.floor(n)) if self.drop_last else math.ceil(n)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        import torch

        n = len(self.x)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.x.device)
        else:
            order = torch.arange(n, device=self.x.device)
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            xb = self.x[index]
            if self.transform is not None:
                xb = torch.stack([self.transform(sample) for sample in xb])
            yield xb, self.y[index]


def evaluation_batches(x: Tensor, y: Tensor, batch_size: int = 4096) -> Iterator[tuple[Tensor, Tensor]]:
    """Fixed-order batches for evaluation (no shuffling, no augmentation)."""
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


def _as_float(x: Tensor) -> Tensor:
    import torch

    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float() if not torch.is_floating_point(x) or x.dtype == torch.float64 else x
