"""What a run logs through: the :class:`RunTracker` protocol, met by :class:`optiflow.tracking.Tracker` (one MLflow
run) and by :class:`NullTracker` (the data-parallel processes that do not log)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from optiflow import drawing


class RunTracker(Protocol):
    """What a run logs through (``Run.tracker``, :func:`optiflow.tracking.run_status`); ``run_id`` is None until
    its MLflow run is open."""

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id; None before it opens, and on processes that log nothing."""

    @property
    def uri(self) -> str | None:
        """The tracking store's URI (None where nothing is logged)."""

    def log_params(self, params: Mapping[str, object], flush: bool = True) -> None:
        """Log params (values as text, passwords in URLs masked); ``flush=False`` batches them with the next write."""

    def log_metrics(self, metrics: Mapping[str, object], step: int | None = None, flush: bool = True) -> None:
        """Log the numeric ``metrics`` at ``step`` (others are dropped); ``flush=False`` batches them."""

    def flush_due(self, seconds: float) -> None:
        """Write what is batched if the last write is ``seconds`` old."""

    def flush(self) -> None:
        """Write what is batched now."""

    def set_tags(self, tags: Mapping[str, object]) -> None:
        """Set tags on the run (values as text)."""

    def delete_tag(self, key: str) -> None:
        """Remove tag ``key`` if the run has it."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """Save ``text`` as the artifact ``artifact_file``."""

    def log_figure(self, figure: Figure | drawing.Recipe, artifact_file: str) -> None:
        """Save a matplotlib figure as the artifact ``artifact_file`` (``.png``); a
        :class:`~optiflow.drawing.Recipe` is drawn beside the run, logged by :meth:`collect_figures` or as it ends."""

    def prepare_figures(self) -> None:
        """Start what draws recipes now (a run that will log figures: matplotlib loads while it trains)."""

    def collect_figures(self, raise_errors: bool = True) -> dict[str, Exception]:
        """Log the recipes' figures once drawn; raise the first error of one that could not be, or return them."""

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file into the run's artifacts (under ``artifact_path``)."""

    def log_model(self, flavor: ModuleType, metadata: dict[str, object], **kwargs: object) -> None:
        """Log the run's model (see :func:`optiflow.export.log_model`)."""

    def end(self, status: str = "FINISHED", ended_ms: int | None = None) -> None:
        """Write what is batched and end the run with ``status`` (FINISHED, FAILED or KILLED)."""


class NullTracker:
    """Stands in for :class:`optiflow.tracking.Tracker` on every data-parallel process but rank 0: logs nothing."""

    run_id: str | None = None
    uri: str | None = None

    def start(self, run_name: str | None = None, tags: Mapping[str, object] | None = None,
              parent_run_id: str | None = None, run_id: str | None = None, started_ms: int | None = None) -> None:
        """Opens nothing: the process that logs opens the run."""

    def log_params(self, params: Mapping[str, object], flush: bool = True) -> None: ...

    def log_metrics(self, metrics: Mapping[str, object], step: int | None = None, flush: bool = True) -> None: ...

    def flush_due(self, seconds: float) -> None: ...

    def flush(self) -> None: ...

    def set_tags(self, tags: Mapping[str, object]) -> None: ...

    def delete_tag(self, key: str) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_figure(self, figure: Figure | drawing.Recipe, artifact_file: str) -> None: ...

    def prepare_figures(self) -> None: ...

    def collect_figures(self, raise_errors: bool = True) -> dict[str, Exception]:
        return {}

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_model(self, flavor: ModuleType, metadata: dict[str, object], **kwargs: object) -> None: ...

    def end(self, status: str = "FINISHED", ended_ms: int | None = None) -> None: ...
