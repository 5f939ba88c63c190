"""Matplotlib figures the runner and the experiment commands log (Agg backend, no display)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from optiflow.confidence import Interval


def pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def epoch_ticks(axis: Axes) -> None:
    """Whole epochs on the x axis: no tick at epoch 1.5."""
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def learning_curves(history: dict[str, list[float]], title: str = "") -> Figure:
    """Loss curves (train/validation) beside the accuracy or RMSE curves, per epoch."""
    plt = pyplot()
    quality = [k for k in ("train_accuracy", "val_accuracy", "val_rmse", "val_r2") if k in history]
    figure, axes = plt.subplots(1, 2 if quality else 1, figsize=(10 if quality else 5.5, 4), squeeze=False)
    for key in ("train_loss", "val_loss"):
        if key in history:
            epochs = range(1, len(history[key]) + 1)
            axes[0][0].plot(epochs, history[key], marker=".", label=key.replace("_", " "))
    axes[0][0].set(xlabel="epoch", ylabel="loss", title="loss")
    axes[0][0].legend()
    epoch_ticks(axes[0][0])
    if quality:
        for key in quality:
            epochs = range(1, len(history[key]) + 1)
            axes[0][1].plot(epochs, history[key], marker=".", label=key.replace("_", " "))
        axes[0][1].set(xlabel="epoch", title="quality")
        axes[0][1].legend()
        epoch_ticks(axes[0][1])
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def overlay_curves(histories: dict[str, list[dict[str, list[float]]]], title: str = "") -> Figure:
    """Training and validation loss of every variant on shared axes (mean over seeds, min-max band)."""
    import numpy as np

    plt = pyplot()
    keys = [k for k in ("train_loss", "val_loss") if any(k in h for runs in histories.values() for h in runs)]
    figure, axes = plt.subplots(1, len(keys) or 1, figsize=(6 * max(len(keys), 1), 4.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, key in zip(axes[0], keys):
        for index, (label, runs) in enumerate(histories.items()):
            curves = [h[key] for h in runs if h.get(key)]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            stacked = np.array([c[:length] for c in curves])
            epochs = np.arange(1, length + 1)
            color = colors[index % len(colors)]
            axis.plot(epochs, stacked.mean(0), color=color, label=label)
            if len(curves) > 1:
                axis.fill_between(epochs, stacked.min(0), stacked.max(0), color=color, alpha=0.2)
        lines = [v for line in axis.get_lines() for v in line.get_ydata()]
        if lines and min(lines) > 0 and max(lines) / min(lines) > 30:
            axis.set_yscale("log")
        axis.set(xlabel="epoch", ylabel="loss", title=key.replace("_", " ").replace("val", "validation"))
        axis.legend(fontsize="small", loc="best")
        epoch_ticks(axis)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def metric_intervals(labels: list[str], values: list[list[float]], intervals: list[Interval | None],
                     metric: str) -> Figure:
    """The final metric per variant: each seed as a dot, the mean as a bar from zero and, with several seeds,
    its 95% t-interval (``intervals``: :class:`~optiflow.confidence.Interval` or None) as error bars."""
    import numpy as np

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(max(6.0, 1.6 * len(labels) + 2), 5))
    means = [float(np.mean(v)) if v else float("nan") for v in values]
    positions = np.arange(len(labels))
    errors = np.array([[m - i.low, i.high - m] if i is not None else [0.0, 0.0] for m, i in zip(means, intervals)]).T
    several = any(i is not None for i in intervals)
    axis.bar(positions, means, color="tab:blue", alpha=0.5, label="mean")
    if several:
        axis.errorbar(positions, means, yerr=errors.reshape(2, -1), fmt="none", ecolor="black", capsize=6,
                      label="95% t-interval of the mean")
    for position, seeds in zip(positions, values):
        axis.scatter([position] * len(seeds), seeds, color="black", s=12, zorder=3,
                     label="one seed" if position == 0 else None)
    axis.set_xticks(positions, [label.replace(" ", "\n") for label in labels], fontsize="small",
                    rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    most = max((len(v) for v in values), default=0)
    what = (f"mean and 95% t-interval over {most} seeds" if several
            else "one seed per variant: no interval can be given")
    axis.set(ylabel=metric, title=f"final {metric} ({what})")
    axis.set_ylim(bottom=min([0.0, *(v for seeds in values for v in seeds if np.isfinite(v))]))
    axis.legend(fontsize="small", loc="lower right")
    figure.tight_layout()
    return figure


def lr_schedule(positions: list[float], rates: list[float], title: str = "", warmup_end: float | None = None) -> Figure:
    """The learning rate over training (x in epochs), the warmup phase shaded."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(positions, rates, color="tab:blue")
    if warmup_end:
        axis.axvspan(0, warmup_end, color="tab:orange", alpha=0.15, label="warmup")
        axis.legend()
    axis.set(xlabel="epoch", ylabel="learning rate", title=title or "learning-rate schedule")
    axis.set_xlim(0, max(positions) if positions else 1)
    epoch_ticks(axis)
    figure.tight_layout()
    return figure


#: fewer complete trials than this make a parameter-importance estimate rough, and its plot says so
FEW_TRIALS = 20


def study_plot(artifact: str, trials: list[dict[str, Any]], metric: str, complete: int, direction: str) -> Any:
    """The plot ``artifact`` of a search (:func:`optiflow.search.summary._log_plots`), drawn from a copy of the
    study's ``trials``; it imports Optuna, not torch (the helper of :mod:`optiflow.drawing` draws it)."""
    import warnings

    import optuna
    from optuna.distributions import json_to_distribution

    visualization = optuna.visualization.matplotlib
    study = optuna.create_study(direction=optuna.study.StudyDirection[direction.upper()],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.add_trials([optuna.trial.create_trial(
        state=optuna.trial.TrialState[t["state"]], value=t["value"], params=t["params"],
        distributions={k: json_to_distribution(d) for k, d in t["distributions"].items()},
        intermediate_values={int(step): value for step, value in t["intermediate"].items()}) for t in trials])
    rough = ": few trials, a rough estimate" if complete < FEW_TRIALS else ""
    plots: dict[str, tuple[Callable[..., Any], str | None]] = {
        "optimization_history.png": (visualization.plot_optimization_history, None),
        "param_importances.png": (visualization.plot_param_importances,
                                  f"importance for {metric}, from {complete} complete trials{rough}"),
        "intermediate_values.png": (visualization.plot_intermediate_values, f"{metric} per epoch of each trial"),
    }
    plot, title = plots[artifact]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = plot(study) if artifact == "intermediate_values.png" else plot(study, target_name=metric)
    figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
    if title is not None:
        axis = figure.axes[0]
        for where in ("left", "right"):  # Optuna's own title (left on the importances) would overlap ours
            axis.set_title("", loc=where)
        axis.set_title(title)
        if artifact == "intermediate_values.png":
            axis.set_ylabel(metric)
    figure.set_size_inches(8, 5)
    figure.tight_layout()
    return figure
