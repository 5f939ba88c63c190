"""The gallery's pictures, drawn from the runs an example logged (MlflowClient metric histories and models).

``draw(client, runs, spec)`` picks the picture by ``spec["kind"]`` and returns the matplotlib figure and the
numbers it shows: ``{"rows": {variant: {quantity: value}}}``, written to the example's finding.md.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Numbers = dict[str, Any]


def draw(client, runs: list, spec: dict[str, Any], title: str = "") -> tuple[Any, Numbers]:
    """The picture ``spec["kind"]`` of ``runs`` (those an example's commands just logged)."""
    kind = spec.get("kind", "curves")
    if kind not in PICTURES:
        raise ValueError(f"unknown picture kind {kind!r}; choose from {', '.join(PICTURES)}")
    figure, numbers = PICTURES[kind](client, runs, spec)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure, numbers


def trained_runs(runs: list) -> list:
    """The runs that trained a model: not the parent runs of compare or search (they only summarize)."""
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
    return [r for r in runs if r.info.run_id not in parents]


def label(run) -> str:
    """The run's name (compare names each child by its variant), marked when training did not finish."""
    name = run.info.run_name or run.info.run_id[:8]
    return name if run.info.status == "FINISHED" else f"{name} ({run.info.status.lower()})"


def history(client, run, metric: str) -> tuple[list[int], list[float]]:
    """Steps and values of ``metric`` in step order."""
    points = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
    return [m.step for m in points], [m.value for m in points]


def summary_row(run, keys: tuple[str, ...] = ("train_loss", "val_loss", "test_loss", "test_accuracy",
                                              "test_rmse")) -> dict[str, float]:
    """The final values of the usual metrics that the run has."""
    return {key: run.data.metrics[key] for key in keys if key in run.data.metrics}


def curves(client, runs: list, spec: dict[str, Any]) -> tuple[Any, Numbers]:
    """One panel per metric, one line per run: the classic side-by-side loss curves."""
    runs = trained_runs(runs)
    metrics = spec.get("metrics", ["train_loss", "val_loss"])
    figure, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4), squeeze=False)
    rows = {}
    for run in runs:
        rows[label(run)] = summary_row(run)
        for axis, metric in zip(axes[0], metrics):
            steps, values = history(client, run, metric)
            axis.plot(steps, values, label=label(run), linewidth=1.2 if len(steps) > 60 else 1.6)
    for axis, metric in zip(axes[0], metrics):
        axis.set(xlabel=spec.get("xlabel", "batch" if metric.endswith("_step") else "epoch"), ylabel=metric,
                 title=metric.replace("_", " "))
        if spec.get("logy"):
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    return figure, {"rows": rows}


def fits(client, runs: list, spec: dict[str, Any]) -> tuple[Any, Numbers]:
    """Each logged model's predictions on a grid against the true function (the activation picture)."""
    import mlflow.pytorch
    import torch

    runs = trained_runs(runs)
    low, high = spec.get("x_range", [-5.0, 5.0])
    truth = TRUE_FUNCTIONS[spec.get("truth", "sin")]
    grid = np.linspace(low, high, 400, dtype=np.float32)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(grid, truth(grid), color="black", linewidth=2.5, label="truth", zorder=0)
    rows = {}
    for run in (r for r in runs if r.info.status == "FINISHED"):
        if run.data.params.get("norm", "none") != "none":
            raise ValueError(f"the fits picture feeds raw x to the model: run {label(run)} must use --norm none")
        model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model").eval()
        with torch.no_grad():
            predicted = model(torch.from_numpy(grid).reshape(-1, 1)).reshape(-1).numpy()
        axes[0].plot(grid, predicted, label=label(run), linewidth=1.4)
        steps, values = history(client, run, "train_loss")
        axes[1].plot(steps, values, label=label(run))
        rows[label(run)] = {**summary_row(run), "grid_rmse": float(np.sqrt(np.mean((predicted - truth(grid)) ** 2)))}
    axes[0].set(xlabel="x", ylabel="y", title="fitted curves")
    axes[1].set(xlabel="epoch", ylabel="train_loss", title="train loss", yscale="log")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    return figure, {"rows": rows}


TRUE_FUNCTIONS: dict[str, Callable] = {"sin": np.sin, "cube": lambda x: x**3, "linear": lambda x: 3 * x + 2}


def accuracy(client, runs: list, spec: dict[str, Any]) -> tuple[Any, Numbers]:
    """Validation-accuracy curves beside a bar chart of each run's test accuracy."""
    runs = trained_runs(runs)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows = {}
    for run in runs:
        rows[label(run)] = summary_row(run)
        steps, values = history(client, run, spec.get("curve", "val_accuracy"))
        left.plot(steps, values, marker=".", label=label(run))
    names = list(rows)
    scores = [rows[n].get("test_accuracy", math.nan) for n in names]
    bars = right.bar(range(len(names)), scores, color=[f"C{i}" for i in range(len(names))])
    right.bar_label(bars, fmt="%.3f")
    right.set_xticks(range(len(names)), names, rotation=15 if len(names) > 2 else 0, fontsize=8)
    right.set(ylabel="test accuracy", title="test accuracy", ylim=(max(0.0, min(scores) - 0.1), 1.0))
    left.set(xlabel="epoch", ylabel=spec.get("curve", "val_accuracy"), title=spec.get("curve", "val_accuracy"))
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    return figure, {"rows": rows}


PICTURES: dict[str, Callable] = {"curves": curves, "fits": fits, "accuracy": accuracy}
