"""The figures runs and commands log: axes over epochs tick at whole epochs."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from optiflow.plots import learning_curves, lr_schedule, overlay_curves

HISTORY = {"train_loss": [1.0, 0.6, 0.4], "val_loss": [1.1, 0.7, 0.5], "val_accuracy": [0.5, 0.7, 0.8]}


def epoch_axes(figure) -> list:
    return [axis for axis in figure.axes if axis.get_xlabel() == "epoch"]


@pytest.mark.parametrize("draw", [
    lambda: learning_curves(HISTORY, title="three epochs"),
    lambda: overlay_curves({"a": [HISTORY, HISTORY], "b": [HISTORY]}),
    lambda: lr_schedule([step / 4 for step in range(13)], [0.1 * (1 - step / 13) for step in range(13)], warmup_end=0.5),
], ids=["learning-curves", "overlay-curves", "lr-schedule"])
def test_epoch_axes_tick_at_whole_epochs(draw):
    figure = draw()
    try:
        figure.canvas.draw()
        axes = epoch_axes(figure)
        assert axes
        for axis in axes:
            low, high = axis.get_xlim()
            ticks = [tick for tick in axis.get_xticks() if low <= tick <= high]
            assert len(ticks) >= 2 and all(float(tick).is_integer() for tick in ticks), ticks
            labels = [label.get_text() for label in axis.get_xticklabels() if label.get_text()]
            assert all(label.lstrip("−-").isdigit() for label in labels), labels
    finally:
        plt.close(figure)
