"""Batch-mixing regularizers: mixup and cutmix, through the ``optiflow_train_batch`` hook.

They are regularizers (``--reg mixup:alpha=0.2``) because that is what they are to a user: a
per-run technique with options, combined freely with the others.  Each turns a batch's labels
into soft targets (class probabilities), which the built-in losses accept; label smoothing
(``--reg label-smoothing``) then smooths those, so the three compose in any combination.
"""

from __future__ import annotations

import random

from optiflow import hookimpl
from optiflow.errors import OptiflowError


@hookimpl
def optiflow_register_regularizers(register):
    register("mixup", Mixup)
    register("cutmix", CutMix)


class _Mixing:
    """Shared part: option checks, a seeded random source (checkpointed), soft targets."""

    name = ""

    def __init__(self, alpha: float, probability: float) -> None:
        if alpha <= 0:
            raise OptiflowError(f"{self.name}: alpha must be > 0, got {alpha}")
        if not 0.0 <= probability <= 1.0:
            raise OptiflowError(f"{self.name}: probability must be in [0, 1], got {probability}")
        self.alpha, self.probability = alpha, probability
        self.random: random.Random | None = None

    @hookimpl
    def optiflow_check_run(self, run):
        if run.task != "classification":
            raise OptiflowError(f"{self.name} needs a classification run (it mixes class labels)")

    def draw(self, run) -> float | None:
        """The mixing weight of the kept batch for this step, or None to leave the batch as it is."""
        if self.random is None:
            self.random = random.Random(run.config.seed)
        if self.probability < 1.0 and self.random.random() >= self.probability:
            return None
        return self.random.betavariate(self.alpha, self.alpha)

    def permutation(self, n: int, device):
        import torch

        assert self.random is not None
        return torch.tensor(self.random.sample(range(n), n), device=device)

    @staticmethod
    def mix_targets(run, y, other, lam: float):
        from torch import nn

        if y.ndim == 1:
            y = nn.functional.one_hot(y, run.source.num_classes).float()
        return lam * y + (1.0 - lam) * y[other]

    def state_dict(self) -> dict:
        if self.random is None:
            return {}
        version, internal, gauss = self.random.getstate()
        return {"version": version, "internal": list(internal), "gauss": gauss}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.random = random.Random()
            self.random.setstate((state["version"], tuple(state["internal"]), state["gauss"]))


class Mixup(_Mixing):
    """Trains on convex combinations of sample pairs and of their labels, lambda ~ Beta(alpha, alpha) (Zhang et al. 2018)."""

    name = "mixup"

    def __init__(self, *, alpha: float = 0.2, probability: float = 1.0) -> None:
        super().__init__(alpha, probability)

    @hookimpl
    def optiflow_train_batch(self, run, x, y):
        lam = self.draw(run)
        if lam is None:
            return None
        lam = max(lam, 1.0 - lam)
        other = self.permutation(len(x), x.device)
        return lam * x + (1.0 - lam) * x[other], self.mix_targets(run, y, other, lam)


class CutMix(_Mixing):
    """Pastes a random box of another image into each image, labels mixed by area (Yun et al. 2019)."""

    name = "cutmix"

    def __init__(self, *, alpha: float = 1.0, probability: float = 1.0) -> None:
        super().__init__(alpha, probability)

    @hookimpl
    def optiflow_check_run(self, run):
        super().optiflow_check_run(run)
        if run.splits.x_train.ndim != 4:
            raise OptiflowError("cutmix needs images (channels x height x width); use mixup on feature vectors")

    @hookimpl
    def optiflow_train_batch(self, run, x, y):
        lam = self.draw(run)
        if lam is None:
            return None
        assert self.random is not None
        height, width = x.shape[-2:]
        ratio = (1.0 - lam) ** 0.5
        cy, cx = self.random.randrange(height), self.random.randrange(width)
        top, bottom = max(cy - round(height * ratio / 2), 0), min(cy + round(height * ratio / 2), height)
        left, right = max(cx - round(width * ratio / 2), 0), min(cx + round(width * ratio / 2), width)
        if bottom <= top or right <= left:
            return None
        other = self.permutation(len(x), x.device)
        x = x.clone()
        x[:, :, top:bottom, left:right] = x[other, :, top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (height * width)
        return x, self.mix_targets(run, y, other, lam)
