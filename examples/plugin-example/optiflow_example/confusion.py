"""A role-aware artifact: the test split's confusion matrix, from the predictions optiflow scored.

It is written only where ``run.wants_artifacts`` (not on search trials and folds unless ``--child-artifacts``),
and names the run's role, so a search's refit gets one and its 50 trials do not.
"""

from __future__ import annotations

import json

from optiflow import hookimpl


class ConfusionMatrix:
    """``matrix[true][predicted]`` counts of the test split, computed in ``optiflow_test_end``."""

    def __init__(self) -> None:
        self.matrix: list[list[int]] | None = None

    @hookimpl
    def optiflow_test_end(self, run, metrics, predictions):
        if predictions is None or run.task != "classification":
            return
        import torch

        classes = run.source.num_classes
        pairs = run.splits.y_test * classes + predictions.argmax(1)
        counts = torch.bincount(pairs, minlength=classes * classes).reshape(classes, classes)
        self.matrix = counts.tolist()
        if run.wants_artifacts:
            run.tracker.log_text(json.dumps({"role": run.role, "matrix": self.matrix}), "confusion_matrix.json")
