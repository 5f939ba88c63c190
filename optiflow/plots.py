"""Matplotlib figures the runner and the experiment commands log (Agg backend, no display)."""

from __future__ import annotations

from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(history: dict[str, list[float]], title: str = "") -> Any:
    """Loss curves (train/validation) beside the accuracy or RMSE curves, per epoch."""
    plt = _pyplot()
    quality = [k for k in ("train_accuracy", "val_accuracy", "val_rmse", "val_r2") if k in history]
    figure, axes = plt.subplots(1, 2 if quality else 1, figsize=(10 if quality else 5.5, 4), squeeze=False)
    for key in ("train_loss", "val_loss"):
        if key in history:
            epochs = range(1, len(history[key]) + 1)
            axes[0][0].plot(epochs, history[key], marker=".", label=key.replace("_", " "))
    axes[0][0].set(xlabel="epoch", ylabel="loss", title="loss")
    axes[0][0].legend()
    if quality:
        for key in quality:
            epochs = range(1, len(history[key]) + 1)
            axes[0][1].plot(epochs, history[key], marker=".", label=key.replace("_", " "))
        axes[0][1].set(xlabel="epoch", title="quality")
        axes[0][1].legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure
