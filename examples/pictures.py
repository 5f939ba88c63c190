"""The gallery's pictures, drawn from the runs an example logged (MlflowClient metric histories and models).

``draw(client, runs, spec)`` picks the picture by ``spec["kind"]`` and returns the matplotlib figure and the
numbers it shows: ``{"rows": {variant: {quantity: value}}}``, written to the example's finding.md.
Runs are grouped into variants by compare's ``optiflow.variant`` tag (else by run name), so a variant
trained with several seeds is drawn as its mean with a min-max band.  When a ``compare --repeats N`` parent run
is among the runs, ``numbers["intervals"]`` holds what it logged (per variant the mean and 95% t-interval of its
metric and the paired t-test against the baseline) and the picture draws those intervals.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Numbers = dict[str, Any]
SUMMARY_METRICS = ("train_loss", "val_loss", "test_loss", "test_accuracy", "test_rmse")


def draw(client, runs: list, spec: dict[str, Any], title: str = "") -> tuple[Any, Numbers]:
    """The picture ``spec["kind"]`` of ``runs`` (those an example's commands just logged)."""
    kind = spec.get("kind", "curves")
    if kind not in PICTURES:
        raise ValueError(f"unknown picture kind {kind!r}; choose from {', '.join(PICTURES)}")
    with plt.style.context("default"):  # optuna's plots switch the global style to ggplot
        figure, numbers = PICTURES[kind](client, runs, spec)
        if title:
            figure.suptitle(title)
        figure.tight_layout()
    return figure, numbers


def trained_runs(runs: list) -> list:
    """The runs that trained a model: not the parent runs of compare or search (they only summarize)."""
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
    return [r for r in runs if r.info.run_id not in parents]


def variants(runs: list) -> dict[str, list]:
    """Trained runs grouped by variant, labelled by what tells the variants apart."""
    groups: dict[str, list] = {}
    for run in trained_runs(runs):
        name = run.data.tags.get("optiflow.variant") or run.info.run_name or run.info.run_id[:8]
        groups.setdefault(name, []).append(run)
    return dict(zip(short_labels(list(groups)), groups.values()))


def short_labels(labels: list[str]) -> list[str]:
    """Drop the text every label shares at its start and end (``model=mlp:...,activation=relu`` -> ``relu``)."""
    if len(labels) < 2:
        return labels
    pieces = [re.split(r"(?<=[ ,:=|])", label) for label in labels]
    start = 0
    while all(len(p) > start + 1 for p in pieces) and len({p[start] for p in pieces}) == 1:
        start += 1
    if start > 1 and pieces[0][start - 1].endswith("="):
        start -= 1  # keep an option's name with its value: dropout=0.5, not 0.5
    end = 0
    while all(len(p) > start + end + 1 for p in pieces) and len({p[-1 - end] for p in pieces}) == 1:
        end += 1
    short = ["".join(p[start : len(p) - end]).strip(" ,:|") for p in pieces]
    balanced = all(label.count("[") == label.count("]") for label in short)
    return short if balanced and len(set(short)) == len(short) and all(short) else labels


def history(client, run, metric: str) -> tuple[list[int], list[float]]:
    """Steps and values of ``metric`` in step order."""
    points = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
    return [m.step for m in points], [m.value for m in points]


def mean_history(client, runs: list, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps and the mean, min and max of ``metric`` over the runs (cut to the shortest history)."""
    curves = [history(client, run, metric) for run in runs]
    length = min(len(steps) for steps, _ in curves)
    values = np.array([vals[:length] for _, vals in curves], dtype=float)
    steps = np.array(curves[0][0][:length])
    return steps, values.mean(0), values.min(0), values.max(0)


def summary_row(runs: list, keys: tuple[str, ...] = SUMMARY_METRICS) -> dict[str, Any]:
    """The final values of the usual metrics (means over the variant's runs), and how many runs did not finish."""
    row: dict[str, Any] = {}
    if len(runs) > 1:
        row["runs"] = len(runs)
    for key in keys:
        values = [r.data.metrics[key] for r in runs if key in r.data.metrics]
        if values:
            row[key] = float(np.mean(values))
    failed = sum(r.info.status != "FINISHED" for r in runs)
    if failed:
        row["not finished"] = failed
    return row


def plot_variant(axis, client, runs: list, metric: str, label: str, color: str, **style: Any) -> None:
    steps, mean, low, high = mean_history(client, runs, metric)
    if not len(steps):
        return
    axis.plot(steps, mean, label=label, color=color, linewidth=1.0 if len(steps) > 60 else 1.6, **style)
    if len(runs) > 1:
        axis.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)


def seeds_note(groups: dict[str, list]) -> str:
    """`` (mean of 5 seeds, band min-max)`` when the variants were trained with several seeds."""
    most = max((len(group) for group in groups.values()), default=1)
    return f" (mean of {most} seeds, band min–max)" if most > 1 else ""


def compare_intervals(runs: list) -> Numbers | None:
    """What the last ``compare --repeats N`` (N > 1) parent run among ``runs`` logged: its metric, baseline and,
    per variant (labelled as :func:`variants` labels it), the seeds' values, the mean and 95% t-interval and the
    paired t-test against the baseline (difference, p-value, significant at 5%).  None without such a run."""
    from optiflow.confidence import ALPHA

    parents = [r for r in runs if r.data.tags.get("optiflow.kind") == "compare" and int(r.data.params.get("repeats", 1)) > 1]
    if not parents:
        return None
    parent = parents[-1]
    tags, logged = parent.data.tags, parent.data.metrics
    metric, baseline = tags["metric"], tags["baseline_variant"]
    labels = {int(key.removeprefix("variant_")): value for key, value in tags.items() if re.fullmatch(r"variant_\d+", key)}
    ordered = [labels[index] for index in sorted(labels)]
    short = dict(zip(ordered, short_labels(ordered)))
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    rows: dict[str, dict[str, Any]] = {}
    for index, label in sorted(labels.items()):
        prefix = f"variant_{index}.{metric}_"
        seeds = [r.data.metrics[metric] for r in children
                 if r.data.tags.get("optiflow.variant") == label and metric in r.data.metrics]
        row: dict[str, Any] = {"seeds": seeds, "mean": logged.get(prefix + "mean"), "low": logged.get(prefix + "ci_low"),
                               "high": logged.get(prefix + "ci_high")}
        if prefix + "p_value" in logged:
            row.update(difference=logged[prefix + "difference"], p=logged[prefix + "p_value"],
                       significant=logged[prefix + "p_value"] < ALPHA)
        rows[short[label]] = row
    return {"metric": metric, "baseline": short[baseline], "repeats": int(parent.data.params["repeats"]), "rows": rows}


def with_intervals(numbers: Numbers, found: Numbers | None) -> Numbers:
    return {**numbers, "intervals": found} if found is not None else numbers


def plot_intervals(axis, found: Numbers) -> None:
    """Each variant's seeds as dots and the mean with its 95% t-interval as an error bar; * marks a variant whose
    paired difference to the baseline is significant at 5%."""
    names = list(found["rows"])
    for position, name in enumerate(names):
        row = found["rows"][name]
        axis.scatter([position] * len(row["seeds"]), row["seeds"], color=f"C{position}", s=10, alpha=0.6,
                     label="one seed" if position == 0 else None)
        if row["mean"] is not None and row["low"] is not None:
            axis.errorbar([position], [row["mean"]], yerr=[[row["mean"] - row["low"]], [row["high"] - row["mean"]]],
                          fmt="o", color="black", capsize=6, label="mean, 95% t-interval" if position == 0 else None)
    ticks = [name + (" (baseline)" if name == found["baseline"] else " *" if found["rows"][name].get("significant")
                     else "") for name in names]
    axis.set_xticks(range(len(names)), ticks, rotation=15 if len(names) > 2 else 0, fontsize=8)
    axis.set_xlim(-0.5, len(names) - 0.5)
    axis.set(ylabel=found["metric"], title=f"final {found['metric']} over {found['repeats']} seeds\n"
                                          f"(* differs from {found['baseline']}: paired t-test, 5%)")
    _finish_axis(axis, False)  # linear: an interval may reach below zero


def curves(client, runs: list, spec: dict[str, Any]) -> tuple[Any, Numbers]:
    """One panel per metric, one line per variant: the classic side-by-side loss curves."""
    groups = variants(runs)
    metrics = spec.get("metrics", ["train_loss", "val_loss"])
    found = compare_intervals(runs)
    panels = len(metrics) + (found is not None)
    figure, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4), squeeze=False)
    for index, (name, group) in enumerate(groups.items()):
        for axis, metric in zip(axes[0], metrics):
            plot_variant(axis, client, group, metric, name, f"C{index}")
    for axis, metric in zip(axes[0], metrics):
        axis.set(xlabel="batch" if metric.endswith("_step") else "epoch", ylabel=metric,
                 title=metric.replace("_", " ") + seeds_note(groups))
        _finish_axis(axis, spec.get("logy", False))
    if found is not None:
        plot_intervals(axes[0][-1], found)
    return figure, with_intervals({"rows": {name: summary_row(group) for name, group in groups.items()}}, found)


def train_vs_val(client, runs: list, spec: dict[str, Any]) -> tuple[Any, Numbers]:
    """One panel per variant with its training and validation loss: the overfitting picture."""
    groups = variants(runs)
    figure, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4), squeeze=False, sharey=True)
    rows = {}
    for axis, (name, group) in zip(axes[0], groups.items()):
        plot_variant(axis, client, group, "train_loss", "train loss", "C0")
        plot_variant(axis, client, group, "val_loss", "validation loss", "C1")
        axis.set(xlabel="epoch", ylabel="loss", title=name)
        _finish_axis(axis, spec.get("logy", False))
        row = summary_row(group)
        if "train_loss" in row and "val_loss" in row:
            row["val - train"] = row["val_loss"] - row["train_loss"]
            row["lowest val_loss"] = float(mean_history(client, group, "val_loss")[1].min())
        rows[name] = row
    return figure, {"rows": rows}


def fits(client, runs: list, spec: dict[str, Any]) -> tuple[Any, Numbers]:
    """Each logged model's predictions on a grid against the true function (the activation picture)."""
    import mlflow.pytorch
    import torch

    low, high = spec.get("x_range", [-5.0, 5.0])
    truth = TRUE_FUNCTIONS[spec.get("truth", "sin")]
    grid = np.linspace(low, high, 400, dtype=np.float32)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(grid, truth(grid), color="black", linewidth=3, alpha=0.35, label="truth")
    rows = {}
    for index, (name, group) in enumerate(variants(runs).items()):
        run = group[0]
        rows[name] = summary_row(group)
        plot_variant(axes[1], client, group, "train_loss", name, f"C{index}")
        if run.info.status != "FINISHED":
            continue
        if run.data.params.get("norm", "none") != "none":
            raise ValueError(f"the fits picture feeds raw x to the model: run {name} must use --norm none")
        model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")  # logged in eval mode
        with torch.no_grad():
            predicted = model(torch.from_numpy(grid).reshape(-1, 1)).reshape(-1).numpy()
        axes[0].plot(grid, predicted, label=name, color=f"C{index}", linewidth=1.4)
        rows[name]["rmse vs truth"] = float(np.sqrt(np.mean((predicted - truth(grid)) ** 2)))
    axes[0].set(xlabel="x", ylabel="y", title="fitted curves")
    axes[1].set(xlabel="epoch", ylabel="train_loss", title="train loss")
    _finish_axis(axes[0], False)
    _finish_axis(axes[1], True)
    return figure, {"rows": rows}


TRUE_FUNCTIONS: dict[str, Callable] = {"sin": np.sin, "cube": lambda x: x**3, "linear": lambda x: 3 * x + 2}


def accuracy(client, runs: list, spec: dict[str, Any]) -> tuple[Any, Numbers]:
    """A per-epoch curve (validation accuracy by default) beside a bar chart of each variant's test accuracy."""
    groups = variants(runs)
    curve = spec.get("curve", "val_accuracy")
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows = {name: summary_row(group) for name, group in groups.items()}
    for index, (name, group) in enumerate(groups.items()):
        plot_variant(left, client, group, curve, name, f"C{index}", marker="." if len(groups) < 4 else None)
    left.set(xlabel="epoch", ylabel=curve, title=curve.replace("_", " ") + seeds_note(groups))
    _finish_axis(left, spec.get("logy", False))
    found = compare_intervals(runs)
    if found is not None:
        plot_intervals(right, found)
        return figure, with_intervals({"rows": rows}, found)
    names = list(rows)
    scores = [rows[n].get("test_accuracy", math.nan) for n in names]
    bars = right.bar(range(len(names)), scores, color=[f"C{i}" for i in range(len(names))])
    right.bar_label(bars, fmt="%.3f")
    right.set_xticks(range(len(names)), names, rotation=15 if len(names) > 2 else 0, fontsize=8)
    low = max(0.0, float(np.nanmin(scores)) - 0.1)
    right.set(ylabel="test accuracy" + (f" (axis from {low:.2f}, not 0)" if low > 0 else ""), title="test accuracy",
              ylim=(low, 1.0))
    return figure, {"rows": rows}


def gradient_flow(client, runs: list, spec: dict[str, Any]) -> tuple[Any, Numbers]:
    """Per-layer gradient norms (input to output, log scale) at the first and last epoch, beside accuracy curves."""
    groups = variants(runs)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows = {}
    for index, (name, group) in enumerate(groups.items()):
        run = group[0]
        layers = sorted((key for key in run.data.metrics if key.startswith(GRADIENT_PREFIX)), key=_layer_order)
        if not layers:
            raise ValueError(f"run {name} logged no {GRADIENT_PREFIX}* metrics (gradient diagnostics are off?)")
        first = np.array([history(client, run, layer)[1][0] for layer in layers])
        last = np.array([run.data.metrics[layer] for layer in layers])
        positions = range(1, len(layers) + 1)
        left.plot(positions, first, marker="o", color=f"C{index}", label=f"{name}, epoch 1")
        left.plot(positions, last, marker=".", linestyle="--", color=f"C{index}", label=f"{name}, last epoch")
        plot_variant(right, client, group, spec.get("curve", "val_accuracy"), name, f"C{index}")
        rows[name] = {**summary_row(group), "first-layer grad (epoch 1)": float(first[0]),
                      "last-layer grad (epoch 1)": float(first[-1]), "last / first (epoch 1)": float(first[-1] / first[0])}
    left.set(xlabel="layer with weights (input → output)", ylabel="gradient L2 norm", title="gradient flow")
    right.set(xlabel="epoch", ylabel=spec.get("curve", "val_accuracy"), title=spec.get("curve", "val_accuracy"))
    _finish_axis(left, True)
    _finish_axis(right, False)
    return figure, {"rows": rows}


def search_history(client, runs: list, spec: dict[str, Any]) -> tuple[Any, Numbers]:
    """Best objective so far against the trial number, one line per search (study), beside every trial's value."""
    children: dict[str, list] = {}
    for run in runs:
        if run.data.tags.get("optiflow.role") != "refit":  # the best trial trained again is not a trial
            children.setdefault(run.data.tags.get("mlflow.parentRunId", ""), []).append(run)
    searches = [run for run in runs if run.data.tags.get("optiflow.kind") == "search"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows = {}
    for index, parent in enumerate(searches):
        metric, direction = parent.data.params["metric"], parent.data.params["direction"]
        better = max if direction == "maximize" else min
        trials = sorted(children.get(parent.info.run_id, []), key=lambda r: int(r.data.params["optuna.trial_number"]))
        scored = [(int(r.data.params["optuna.trial_number"]) + 1, r.data.metrics[metric], r) for r in trials
                  if r.info.status == "FINISHED" and metric in r.data.metrics]
        if not scored:
            raise ValueError(f"search {parent.info.run_name} has no finished trial with {metric}")
        numbers, values = [n for n, _, _ in scored], [v for _, v, _ in scored]
        best_so_far = [better(values[: i + 1]) for i in range(len(values))]
        name = parent.data.params.get("sampler", parent.info.run_name)
        left.step(numbers, best_so_far, where="post", color=f"C{index}", label=name)
        right.scatter(numbers, values, color=f"C{index}", s=14, label=name)
        best_value = better(values)
        best_trial = numbers[values.index(best_value)]
        best_run = scored[values.index(best_value)][2]
        sampled = {k[len("trial."):]: v for k, v in best_run.data.params.items() if k.startswith("trial.")}
        rows[name] = {"trials": len(trials), f"best {metric}": best_value, "found at trial": best_trial,
                      "best test_accuracy": best_run.data.metrics.get("test_accuracy"),
                      "best params": ", ".join(f"{k}={_short(v)}" for k, v in sorted(sampled.items()))}
    left.set(xlabel="trial", ylabel=f"best {metric} so far", title="best so far")
    right.set(xlabel="trial", ylabel=metric, title="every trial")
    if spec.get("ylim"):
        right.set_ylim(*spec["ylim"])
    _finish_axis(left, spec.get("logy", False))
    _finish_axis(right, spec.get("logy", False))
    return figure, {"rows": rows}


def _short(value: str) -> str:
    try:
        return f"{float(value):.3g}"
    except ValueError:
        return value


GRADIENT_PREFIX = "grad_norm/"


def _layer_order(metric: str) -> tuple:
    """``grad_norm/fc10`` after ``grad_norm/fc9``: numbers in a layer name compare as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"[./]|(\d+)", metric)
                 if part)


def _finish_axis(axis, logy: bool) -> None:
    if logy:
        axis.set_yscale("log")
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)


PICTURES: dict[str, Callable] = {"curves": curves, "train-vs-val": train_vs_val, "fits": fits, "accuracy": accuracy,
                                 "gradient-flow": gradient_flow, "search": search_history}
