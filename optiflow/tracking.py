"""Everything MLflow: the store, runs, batched metrics, artifacts, models and run status."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, TypeVar

from optiflow import __version__, bulkwrite, drawing, heartbeat
from optiflow.errors import OptiflowError, RunKilled, TrackingServerLost, first_line, redact
from optiflow.runlog import RunTracker
from optiflow.signals import deferred
from optiflow.stores import (
    check_database_file,
    check_same_file,
    check_scheme,
    client,
    created_folder,
    disk_full,
    file_identity,
    is_server,
    sqlite_path,
    store_failure,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

T = TypeVar("T")

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
PARAM_BATCH = 100
METRIC_BATCH = 1000
_RETRIES = 8
_LOST_SERVER = re.compile(r"API request to (https?://[^/\s]+)\S* failed with exception")
#: the ``optiflow`` arguments as the user typed them, while a CLI command runs (None: called from Python)
CLI_ARGS: list[str] | None = None


def command_line() -> str:
    """What made a run, as its ``optiflow.command`` tag says: the ``optiflow`` command line while a CLI command
    runs, else this process's own command line."""
    if CLI_ARGS is not None:
        return shlex.join(["optiflow", *CLI_ARGS])
    argv = sys.argv
    return shlex.join(["optiflow", *argv[1:]]) if argv and "optiflow" in argv[0] else shlex.join(argv)


def resolve_tracking_uri(uri: str | None = None, *, existing: bool = False) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the local SQLite store; ``existing``: a named one must exist."""
    uri = (given := uri or os.environ.get("MLFLOW_TRACKING_URI")) or DEFAULT_TRACKING_URI
    check_scheme(uri)
    path = sqlite_path(uri)
    if path is not None and str(path) != ":memory:":
        if existing and given and not path.is_file():
            raise OptiflowError(f"no tracking store at {path}: check --tracking-uri (or $MLFLOW_TRACKING_URI)")
        try:
            created_folder(path.parent)
        except OSError as exc:
            raise OptiflowError(f"cannot create the tracking store folder {path.parent}: {exc.strerror}") from None
        check_database_file(path)
    return uri


def ui_command(uri: str) -> str:
    """How to open the MLflow UI on this store: a tracking server's own URL, else the shell command that serves it."""
    if is_server(uri):
        return uri
    return f"mlflow ui --backend-store-uri {uri}" if uri != DEFAULT_TRACKING_URI else "optiflow ui"


def retry(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Call an MLflow client method, retrying while a shared SQLite store is locked; a full disk is one
    :class:`optiflow.errors.DiskFull` naming where the write went."""
    from mlflow.exceptions import MlflowException

    try:
        for attempt in range(_RETRIES):
            try:
                with deferred():
                    return fn(*args, **kwargs)
            except MlflowException as exc:
                lost = _LOST_SERVER.search(str(exc))
                if lost:
                    raise TrackingServerLost(f"lost the tracking server {redact(lost.group(1))}: "
                                             f"{store_failure(exc)}") from None
                if attempt == _RETRIES - 1 or ("locked" not in str(exc).lower() and "busy" not in str(exc).lower()):
                    raise
            time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")
    except (OSError, MlflowException) as exc:
        full = disk_full(exc, fn, args)
        if full is None:
            raise
        raise full from None


_EXPERIMENTS: dict[tuple[str, tuple[int, int] | None, int, str], str] = {}


def experiment_id(mlflow_client: MlflowClient, uri: str, name: str) -> str:
    """The id of experiment ``name``, created if missing (safe when processes race to create it).

    Looked up once per store (its file, for SQLite), name and process (a search opens a run per trial): every
    run created checks in its own write that the experiment is still there and active."""
    key = (uri, file_identity(uri), os.getpid(), name)
    if key not in _EXPERIMENTS:
        _EXPERIMENTS[key] = _experiment_id(mlflow_client, uri, name)
    return _EXPERIMENTS[key]


def _experiment_id(mlflow_client: MlflowClient, uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    if not name.strip() or len(name) > 500:
        raise OptiflowError(f"an experiment name must be 1 to 500 characters and not blank, got {name[:40]!r}")
    experiment = retry(mlflow_client.get_experiment_by_name, name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    path = sqlite_path(uri)
    if path is not None:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        location = (path.resolve().parent / "artifacts" / safe).as_uri()
    try:
        return retry(mlflow_client.create_experiment, name, artifact_location=location)
    except MlflowException:
        experiment = retry(mlflow_client.get_experiment_by_name, name)
        if experiment is None:
            raise
        return experiment.experiment_id


class Tracker:
    """One MLflow run, driven through ``MlflowClient`` (thread- and process-safe, no global state).

    :meth:`start` creates a run (:func:`log_finished` several at once); params, metrics and tags logged before it
    are kept and written with the run as it opens (folds trained stacked are logged once they finish).
    """

    def __init__(self, uri: str | None, experiment: str, known: tuple[str, tuple[int, int] | None] | None = None) -> None:
        self.uri = uri if uri and known else resolve_tracking_uri(uri)
        self.experiment = experiment
        self.client = client(self.uri)
        self.experiment_id, self.store_file = known or (  # every write first checks the store is still that file
            experiment_id(self.client, self.uri, experiment), file_identity(self.uri))
        self.run_id: str | None = None
        #: when the last checkpoint was saved (time.monotonic), see :func:`optiflow.checkpoints.save_periodically`
        self.checkpoint_saved_at: float | None = None
        #: how long the last checkpoint took to save: checkpoints take at most 1/20 of the training time
        self.checkpoint_cost = 0.0
        self._pending: list[Metric] = []
        self._pending_params: list[Param] = []
        self._pending_tags: dict[str, str] = {}
        self._flushed_at = time.monotonic()
        self.drawer = drawing.Drawer()  #: draws the run's figures beside it (optiflow.drawing)

    def start(self, run_name: str | None = None, tags: Mapping[str, object] | None = None,
              parent_run_id: str | None = None, run_id: str | None = None, started_ms: int | None = None) -> str:
        """Open a new run (``started_ms``: when it began, default now) or reopen ``run_id`` to resume it (it beats
        before it says RUNNING); what was logged before is written to it; returns its id.  The heartbeat goes in
        with the run: a process killed at once leaves a run that ``optiflow runs --stale`` finds."""
        opening, pending, self._pending_tags = self.opening_tags(tags, parent_run_id), self._pending_tags, {}
        if run_id is not None:
            self.run_id = run_id
            heartbeat.beat(self)
            retry(self.client.update_run, run_id, status="RUNNING")
            if pending:
                self.set_tags(pending)
        else:
            self.run_id = self._create(run_name, opening, int(time.time() * 1000) if started_ms is None else started_ms)
        self.flush()
        return self.run_id

    def _create(self, run_name: str | None, opening: dict[str, str], started_ms: int) -> str:
        """Create the run RUNNING with its opening tags (returns its id): on a SQL store with the params and
        metrics queued so far in one transaction (:func:`optiflow.bulkwrite.write_finished`), else through the
        client (``start`` flushes what is queued)."""
        check_same_file(self.uri, self.store_file)
        if run_name and "mlflow.runName" not in opening and len(self._pending_params) <= PARAM_BATCH:
            run = bulkwrite.FinishedRun(run_name, opening, self._pending_params, self._pending, status="RUNNING")
            if retry(bulkwrite.write_finished, self.client, self.experiment_id, [run], started_ms, None):
                self._pending_params, self._pending = [], []
                return str(run.run_id)
        created = retry(self.client.create_run, self.experiment_id, start_time=started_ms, run_name=run_name,
                        tags=opening)
        return str(created.info.run_id)

    def sibling(self) -> Tracker:
        """A tracker for another run of this one's store and experiment, which it does not look up again."""
        return Tracker(self.uri, self.experiment, known=(self.experiment_id, self.store_file))

    def opening_tags(self, tags: Mapping[str, object] | None, parent_run_id: str | None) -> dict[str, str]:
        """The tags a new run opens with: optiflow's version and command, ``tags`` (passwords masked), those set
        before it opened, the heartbeat and the parent run."""
        given = {"optiflow.version": __version__, "optiflow.command": command_line(), **(tags or {})}
        opening = {**{key: redact(str(value)) for key, value in given.items()}, **self._pending_tags,
                   heartbeat.TAG: heartbeat.stamp()}
        if parent_run_id:
            opening["mlflow.parentRunId"] = parent_run_id
        return opening

    def log_params(self, params: Mapping[str, object], flush: bool = True) -> None:
        """Queue params (sent with the next flush, batched with metrics)."""
        from mlflow.entities import Param

        texts = {key: redact(str(value)) for key, value in params.items()}  # MLflow keeps 6000 characters
        self._pending_params.extend(Param(k, v if len(v) <= 6000 else v[:5997] + "...") for k, v in texts.items())
        if flush:
            self.flush()

    def log_metrics(self, metrics: Mapping[str, object], step: int | None = None, flush: bool = True) -> None:
        """Queue metrics (non-numeric values dropped); sent in one batch at the next flush."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(
            Metric(key, float(value), now, step or 0)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        )
        if flush:
            self.flush()

    def flush_due(self, seconds: float) -> None:
        """Flush if the last flush is ``seconds`` old: epochs longer than that write a batch each, as before;
        shorter ones share a write every few seconds (``end`` flushes the rest)."""
        if self._pending and time.monotonic() - self._flushed_at >= seconds:
            self.flush()

    def queued(self) -> list[tuple[str, float, int, int]]:
        """The metrics not yet written, as ``(key, value, timestamp, step)``."""
        return [(m.key, m.value, m.timestamp, m.step) for m in self._pending]

    def flush(self) -> None:
        """Write what is queued, in batches of MLflow's limits; kept while no run is open.  Every write first
        checks the store is still the file the run was opened in (StoreLost)."""
        if self.run_id is None:
            return
        check_same_file(self.uri, self.store_file)
        while self._pending_params or self._pending:
            params, self._pending_params = self._pending_params[:PARAM_BATCH], self._pending_params[PARAM_BATCH:]
            room = METRIC_BATCH - len(params)
            metrics, self._pending = self._pending[:room], self._pending[room:]
            if params or not retry(bulkwrite.log_batch, self.client, self.run_id, metrics):
                retry(self.client.log_batch, self.run_id, metrics=metrics, params=params)
        self._flushed_at = time.monotonic()

    def set_tags(self, tags: Mapping[str, object]) -> None:
        from mlflow.entities import RunTag

        redacted = {k: redact(str(v)) for k, v in tags.items()}
        if self.run_id is None:
            self._pending_tags.update(redacted)
            return
        check_same_file(self.uri, self.store_file)
        retry(self.client.log_batch, self.run_id, tags=[RunTag(k, v) for k, v in redacted.items()])

    def delete_tag(self, key: str) -> None:
        """Remove tag ``key`` from the run if it is there."""
        if self.run_id is None:
            self._pending_tags.pop(key, None)
        elif key in retry(self.client.get_run, self.run_id).data.tags:
            retry(self.client.delete_tag, self.run_id, key)

    def log_text(self, text: str, artifact_file: str) -> None:
        retry(self.client.log_text, self.open_run_id, redact(text), artifact_file)

    def log_figure(self, figure: Figure | drawing.Recipe, artifact_file: str) -> None:
        """Log a matplotlib figure as the artifact ``artifact_file`` now; a :class:`~optiflow.drawing.Recipe` is
        drawn beside the run and logged by :meth:`collect_figures`, at the latest as the run ends."""
        if not isinstance(figure, drawing.Recipe):
            retry(self.client.log_figure, self.open_run_id, figure, artifact_file)
        elif self.open_run_id:  # a run not yet open draws nothing (open_run_id says so)
            self.drawer.draw(figure, artifact_file)

    def prepare_figures(self) -> None:
        """Start the helper that draws recipes (:class:`~optiflow.drawing.Drawer`): a run that will log figures."""
        self.drawer.start()

    def collect_figures(self, raise_errors: bool = True) -> dict[str, Exception]:
        """Log the figures drawn beside the run, once drawn; then raise the error of the first that could not be,
        or (``raise_errors=False``) return each such error by artifact name."""
        with self.drawer.finished() as (drawn, failed):
            for path, artifact_file in drawn:
                self.log_artifact(path, os.path.dirname(artifact_file) or None)
        if failed and raise_errors:
            raise next(iter(failed.values()))
        return failed

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        retry(self.client.log_artifact, self.open_run_id, str(local_path), artifact_path)

    def log_model(self, flavor: ModuleType, metadata: dict[str, object], **kwargs: object) -> None:
        """Log a model under ``model`` on this run (``runs:/<id>/model``), saved by the flavor module's
        ``save_model(path, mlflow_model, **kwargs)`` (optiflow.export: the run's raw-input pipeline)."""
        import mlflow
        from mlflow.models import Model

        run_id = self.open_run_id
        mlflow.set_tracking_uri(self.uri)
        try:
            with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
                Model.log(None, flavor, name="model", run_id=run_id, metadata=metadata,
                          validate_serving_input=False, **kwargs)
        except OSError as exc:
            full = disk_full(exc, self.client.get_run, (run_id,), staged=True)
            if full is None:
                raise
            raise full from None

    def end(self, status: str = "FINISHED", ended_ms: int | None = None) -> None:
        """Log the figures drawn, flush what is queued, close the run as ``status`` at ``ended_ms`` (now)."""
        ended = int(time.time() * 1000) if ended_ms is None else ended_ms
        done = False
        try:
            interrupted = self.drawer.collect_ending(self.log_artifact)
            if self.run_id is not None and not self._pending_params and len(self._pending) <= METRIC_BATCH:
                check_same_file(self.uri, self.store_file)  # on a SQL store: the last metrics and the end at once
                done = retry(bulkwrite.log_batch, self.client, self.run_id, self._pending, end=(status, ended))
                if done:
                    self._pending = []
            if not done:
                self.flush()
        finally:
            if not done:
                retry(self.client.set_terminated, self.open_run_id, status=status, end_time=ended)
        if interrupted is not None:  # Ctrl-C while the figures were awaited: the run ended, with those drawn
            raise interrupted

    @property
    def open_run_id(self) -> str:
        """``run_id`` once the run is open; an error before."""
        if self.run_id is None:
            raise OptiflowError("no MLflow run is open yet: files are logged once it is")
        return self.run_id


def log_finished(trackers: Sequence[Tracker], names: Sequence[str], tags: Sequence[Mapping[str, object]],
                 parent_run_id: str, started_ms: int, ended_ms: int) -> None:
    """Open each tracker's run (named, tagged, a child of ``parent_run_id``) with what it queued and end it
    FINISHED: on a SQL store all in one transaction (:func:`optiflow.bulkwrite.write_finished`), else one by one."""
    check_same_file((first := trackers[0]).uri, first.store_file)
    runs = [bulkwrite.FinishedRun(name, tracker.opening_tags(run_tags, parent_run_id), tracker._pending_params,
                                  tracker._pending) for tracker, name, run_tags in zip(trackers, names, tags)]
    if retry(bulkwrite.write_finished, first.client, first.experiment_id, runs, started_ms, ended_ms):
        for tracker, run in zip(trackers, runs):
            tracker.run_id, tracker._pending_params, tracker._pending, tracker._pending_tags = run.run_id, [], [], {}
        return
    for tracker, name, run_tags in zip(trackers, names, tags):
        tracker.start(name, run_tags, parent_run_id, started_ms=started_ms)
        tracker.end("FINISHED", ended_ms=ended_ms)


class Outcome:
    """How the run of a :func:`run_status` block ends; the block may change it before it completes: ``status`` is
    the status the run gets when the block completes (FINISHED; None leaves the run open for another process to
    end); ``failure`` replaces the ``failure`` tag that an exception sets (its first line)."""

    def __init__(self) -> None:
        self.status: str | None = "FINISHED"
        self.failure: str | None = None


@contextlib.contextmanager
def run_status(tracker: RunTracker) -> Iterator[Outcome]:
    """End ``tracker``'s open run with the right status, whatever happens in the block.

    FINISHED (or the ``Outcome``'s status) when the block completes; KILLED on
    :class:`optiflow.errors.RunKilled` (stopped on purpose, e.g. a pruned trial); KILLED on
    Ctrl-C or SIGTERM and FAILED on any other exception, both with a ``failure`` tag.  The
    exception is re-raised.
    Train, compare and search end every run they open through this one block.
    """
    outcome = Outcome()
    try:
        yield outcome
    except RunKilled:
        outcome.status = "KILLED"
        raise
    except TrackingServerLost:
        outcome.status = None  # nothing can end the run now: `optiflow runs --stale --close` will
        raise
    except BaseException as exc:
        outcome.status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):
            tracker.set_tags({"failure": (outcome.failure or first_line(exc))[:5000]})
        raise
    finally:
        if outcome.status is not None:
            tracker.end(outcome.status)
