"""Seeded held-out splits cut exactly as scikit-learn's ``train_test_split`` cuts them, without importing
scikit-learn: its import (SciPy's statistics and pandas with it) cost a short run more than its training."""

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
