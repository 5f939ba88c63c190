"""What compare, search and reproduce share: final metrics, their direction, and result tables."""

from __future__ import annotations

import csv
import difflib
import io
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from optiflow.errors import OptiflowError

if TYPE_CHECKING:
    from torch import Tensor

TIMING_METRICS = frozenset({"epoch_time", "samples_per_sec", "train_seconds"})
HIGHER_IS_BETTER = ("accuracy", "r2", "f1", "auc", "precision", "recall", "per_sec")


def hits(outputs: Tensor, targets: Tensor) -> Tensor:
    """Which predictions are right: the class each output row scores highest (the last dimension holds the
    classes; one run's ``(N, C)`` or K stacked runs' ``(K, N, C)``) against its target, a class index or, for a
    one-hot or mixed target (mixup, cutmix), the class the target weighs most."""
    return outputs.argmax(-1) == (targets if targets.ndim == outputs.ndim - 1 else targets.argmax(-1))


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (accuracy, R², ...) or worse (losses, RMSE)."""
    return any(metric.endswith(word) for word in HIGHER_IS_BETTER)


def evaluation_metric_names(task: str, prefix: str) -> list[str]:
    """What an evaluation (``optiflow.loop.evaluate``) gives under ``prefix``: the loss, and the accuracy
    (classification) or RMSE and R² (regression)."""
    scores = ("accuracy",) if task == "classification" else ("rmse", "r2")
    return [f"{prefix}_{name}" for name in ("loss", *scores)]


def epoch_metric_names(task: str, validation: bool) -> list[str]:
    """The metrics the core logs every epoch (plugins declare theirs with ``optiflow_metric_names``)."""
    names = ["train_loss", "train_objective", "lr", "epoch_time", "samples_per_sec"] + (["train_accuracy"] if task == "classification"
                                                                      else [])
    return names + (evaluation_metric_names(task, "val") if validation else [])


def check_monitor(owner: str, monitor: str, produced: Collection[str], validation: bool) -> None:
    """Refuse, before the run opens, a metric ``owner`` (``scheduler 'plateau'``) monitors that the run will
    not produce: a ``val_*`` metric without a validation split, a typo, a metric of the other task."""
    if monitor in produced:
        return
    if monitor.startswith("val_") and not validation:
        raise OptiflowError(f"{owner} monitors '{monitor}', but --val-split is 0 (no validation set)")
    close = difflib.get_close_matches(monitor, list(produced), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise OptiflowError(f"{owner} monitors '{monitor}', which this run does not produce{hint}; "
                        f"it produces {', '.join(sorted(produced))}")


#: the core's metric families: a name in them that a run does not produce is a mistake, known before training
CORE_FAMILIES = ("train_", "val_", "test_")


def check_final_metric(owner: str, metric: str, produced: Collection[str], validation: bool,
                       declared: bool = True) -> None:
    """Refuse, before anything trains, a final metric ``owner`` (``--metric``) ranks by that the run will not
    log.  ``produced`` holds every name the run logs when ``declared``; otherwise a third-party plugin adds
    metrics it does not declare, and only a ``val_*`` metric without a validation split, a core metric of the
    other task or a typo of a produced name is refused here: other names are checked on the finished runs."""
    if declared or metric.startswith(CORE_FAMILIES) or difflib.get_close_matches(metric, list(produced), n=1):
        check_monitor(owner, metric, produced, validation)


def final_metrics(metrics: dict[str, float], history: dict[str, list[float]],
                  seconds: float | None = None) -> dict[str, float]:
    """The last value of every per-epoch metric, with the final test metrics and ``train_seconds`` (the
    training's wall time, as every run logs it) when ``seconds`` is given."""
    final = {key: values[-1] for key, values in history.items() if values}
    final.update(metrics)
    if seconds is not None:
        final["train_seconds"] = seconds
    return final


def default_metric(available: Sequence[str]) -> str:
    """``test_accuracy`` for classification runs, ``test_loss`` otherwise."""
    return "test_accuracy" if "test_accuracy" in available else "test_loss"


def csv_text(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buffer.getvalue()


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def number(value: float | None, digits: int = 4) -> str:
    """A metric for a table: ``-`` when missing."""
    return "-" if value is None else f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"
