"""Seeded held-out splits and cross-validation folds cut exactly as scikit-learn's ``train_test_split`` and
``(Stratified)KFold`` cut them, without importing scikit-learn: its import (SciPy's statistics and pandas with
it) cost a short run more than its training, and a search half a second."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import ArrayLike, NDArray


def shuffle_split(n: int, fraction: float, seed: int, stratify: ArrayLike | None = None
                  ) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """(train, test) index arrays of ``n`` samples, ``ceil(fraction * n)`` of them held out: exactly the
    indices of scikit-learn's ``train_test_split(arange(n), test_size=fraction, random_state=seed,
    stratify=stratify)`` (``StratifiedShuffleSplit`` when ``stratify`` gives the classes, else
    ``ShuffleSplit``), without importing scikit-learn (and SciPy and pandas with it), which costs a
    short run more than its training.  Raises ValueError where scikit-learn does."""
    import numpy as np

    n_test = math.ceil(fraction * n)
    n_train = n - n_test
    if not 0 < fraction < 1 or n_train == 0:
        raise ValueError(f"cannot hold out {fraction} of {n} samples and keep any for training")
    if stratify is None:
        permutation = np.random.RandomState(seed).permutation(n)
        return permutation[n_test:], permutation[:n_test]
    classes, y_indices, class_counts = np.unique(np.asarray(stratify), return_inverse=True, return_counts=True)
    if class_counts.min() < 2 or n_train < len(classes) or n_test < len(classes):
        raise ValueError("too few samples of some class to stratify")
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train: list[Any] = []
    test: list[Any] = []
    for i in range(len(classes)):
        members = class_indices[i].take(rng.permutation(class_counts[i]), mode="clip")
        train.extend(members[: n_i[i]])
        test.extend(members[n_i[i] : n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(class_counts: NDArray[np.intp], n_draws: int, rng: np.random.RandomState) -> NDArray[np.intp]:
    """How many of ``n_draws`` each class gets: its floored share, the rest to the largest remainders, ties
    drawn from ``rng`` (scikit-learn's ``utils.extmath._approximate_mode``, step for step)."""
    import numpy as np

    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(np.intp)


def kfold_split(n: int, k: int, seed: int, stratify: ArrayLike | None = None
                ) -> list[tuple[NDArray[np.intp], NDArray[np.intp]]]:
    """The (train, validation) index arrays of each of ``k`` shuffled folds of ``n`` samples: exactly those of
    scikit-learn's ``StratifiedKFold(k, shuffle=True, random_state=seed).split`` when ``stratify`` gives the
    classes, else ``KFold``'s, without importing scikit-learn (half a second of a search).  Raises ValueError
    and warns where scikit-learn does for 1-D class labels (a classification source's class indices, strings
    alike); scikit-learn's refusal of other targets (continuous, multi-output, NaN) is not repeated."""
    import warnings

    import numpy as np

    if n < k:
        raise ValueError(f"Cannot have number of splits n_splits={k} greater than the number of samples: "
                         f"n_samples={n}.")
    rng = np.random.RandomState(seed)
    if stratify is None:
        order = np.arange(n)
        rng.shuffle(order)
        sizes = np.full(k, n // k, dtype=int)
        sizes[: n % k] += 1
        folds = np.empty(n, dtype=int)
        folds[order] = np.repeat(np.arange(k), sizes)
    else:
        _, first, inverse = np.unique(np.asarray(stratify).ravel(), return_index=True, return_inverse=True)
        encoded = np.unique(first, return_inverse=True)[1][inverse]  # classes by order of first appearance
        counts = np.bincount(encoded)
        if np.all(k > counts):
            raise ValueError(f"n_splits={k} cannot be greater than the number of members in each class.")
        if k > counts.min():
            warnings.warn(f"The least populated class in y has only {counts.min()} members, which is less than "
                          f"n_splits={k}.", UserWarning, stacklevel=2)
        ordered = np.sort(encoded)  # each class's share of each fold: round robin over the sorted labels
        allocation = np.asarray([np.bincount(ordered[i::k], minlength=len(counts)) for i in range(k)])
        folds = np.empty(n, dtype="i")
        for label in range(len(counts)):
            assigned = np.arange(k).repeat(allocation[:, label])
            rng.shuffle(assigned)
            folds[encoded == label] = assigned
    indices = np.arange(n)
    return [(indices[folds != fold], indices[folds == fold]) for fold in range(k)]
