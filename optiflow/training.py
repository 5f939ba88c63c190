"""One training, tracked as one MLflow run from setup to model: what ``optiflow train`` runs, and what
compare, search, refit and reproduce run for each of their runs (below them all, so none imports another)."""

from __future__ import annotations

import contextlib
import json
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from optiflow import checkpoints, digest, distributed, drawing, export, heartbeat, host
from optiflow.config import RunConfig
from optiflow.errors import (
    DiskFull,
    OptiflowError,
    PluginError,
    RunInterrupted,
    RunKilled,
    ServiceLost,
    TrackingServerLost,
    first_line,
)
from optiflow.hooktrace import RunPlugins, blame, culprit, owner
from optiflow.loop import evaluate, fit, score
from optiflow.metrics import check_final_metric, check_monitor, epoch_metric_names, evaluation_metric_names
from optiflow.plugins import PluginManager, adds_undeclared_metrics, get_plugin_manager, get_registry
from optiflow.registry import Registry
from optiflow.reuse import finished_run, key_tags, outputs
from optiflow.run import Reporter, Run, RunResult, SilentReporter, prepare, stepped_parts
from optiflow.runlog import NullTracker
from optiflow.signals import InterruptGuard
from optiflow.stored import resume_hint
from optiflow.tracking import Outcome, Tracker, client, resolve_tracking_uri, run_status


def train(config: RunConfig, *, registry: Registry | None = None, pm: PluginManager | None = None,
          reporter: Reporter | None = None, parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None,
          on_epoch: Callable[[int, dict[str, float]], None] | None = None, log_model: bool = True,
          extra_params: dict[str, Any] | None = None, resume: str | None = None, artifacts: bool = True,
          role: str = "train", on_start: Callable[[str], None] | None = None, reuse: bool = False) -> RunResult:
    """Train one model as ``config`` says and track it as one MLflow run.

    ``on_epoch`` is called after every epoch's metrics are logged (search uses
    it to report to Optuna and to prune; raising RunKilled there ends the run
    KILLED).  ``extra_params`` are logged beside the resolved ones.  ``resume`` is the id of a KILLED or
    FAILED run to continue from its checkpoint, in that same run (``config``
    must be its logged configuration: see ``resume_config``).  ``artifacts=False`` logs params and metrics
    only, no figures or files (search's child runs; a failed run still gets its config.yaml): ``run.wants_artifacts``;
    ``role`` is ``run.role`` (:data:`optiflow.run.ROLES`).  ``on_start`` gets the run's id as soon as the run is
    open (search records it on the trial).  ``reuse`` returns the FINISHED run of the same content key and
    experiment instead of training (``reused`` set), if there is one holding what this run would log (never when
    resuming or data-parallel).  Raises
    OptiflowError for bad input before the run starts, TrainingError when
    training diverges, PluginError when a plugin raises, RunInterrupted (a
    KeyboardInterrupt) on SIGINT/SIGTERM; the run then ends FAILED or KILLED
    with a ``failure`` tag, what was logged kept and a checkpoint saved.
    """
    registry = registry or get_registry()
    pm = pm or get_plugin_manager()
    reporter = reporter or SilentReporter()
    with _agreeing():
        run = prepare(config, registry)
    held = outputs(artifacts=artifacts, log_model=log_model, config=config)
    found = finished_run(config, run.key, held) if reuse and resume is None and not distributed.current().enabled \
        else None
    if found is not None:
        return found
    run.role, run.wants_artifacts = role, artifacts
    extra_tags = {**(extra_tags or {}), **key_tags(run.key, held)}
    if run.device.type == "cpu":
        host.keep_freed_memory()
    with per_run_plugins(run, pm) as names, host.threads(run.setup.threads), host.deterministic(config.deterministic):
        tracker, state, cluster = _open(run, pm, names, resume, parent_run_id, extra_tags, extra_params or {})
        if artifacts:
            tracker.prepare_figures()  # matplotlib loads beside the run while it trains
        started = time.perf_counter()
        with InterruptGuard(), run_status(tracker) as outcome, heartbeat.beating(tracker):
            try:
                if on_start is not None and cluster.main:
                    on_start(str(tracker.run_id))
                resumed_from = _begin(run, pm, state)
                with export.traced_beside(run, log_model) as ahead:  # the model traced while it trains
                    fit(run, pm, reporter, on_epoch)
                    reporter.stop()
                    metrics = end_run(run, pm, finish=lambda test: _finish(run, test, log_model, ahead))
                seconds = time.perf_counter() - started
                tracker.log_metrics({"train_seconds": seconds}, step=run.epoch, flush=False)  # written as it ends
            except BaseException as exc:
                error = _record_failure(run, pm, reporter, exc, names, outcome)
                if error is exc:
                    raise
                raise error from exc
    return RunResult(tracker.run_id, metrics, run.history, run.epoch, seconds, tracker.uri, run.stop_reason,
                     resumed_from)


def preflight(config: RunConfig, *, registry: Registry | None = None, pm: PluginManager | None = None) -> Run:
    """Everything :func:`train` checks before its run opens (data, model, optimizer, the schedule rehearsed,
    augmentations tried, monitored metrics, ``optiflow_check_run``), without opening one: compare and search
    call it before their parent run opens, so that bad input is one line and leaves no FAILED run behind.
    Returns the prepared run (its ``metric_names`` are the per-epoch metrics it will log)."""
    registry = registry or get_registry()
    pm = pm or get_plugin_manager()
    run = prepare(config, registry)
    with per_run_plugins(run, pm) as names:
        _check_run(run, pm, names)
    return run


def produced_metric_names(run: Run) -> set[str]:
    """What a prepared run (:func:`preflight`) will log as final metrics: its per-epoch metrics (the core's
    and those plugins declare), with a test split the test evaluation's, and ``train_seconds``."""
    return set(run.final_metric_names or ())


def check_ranking_metric(metric: str, run: Run) -> None:
    """Refuse a ``--metric`` the prepared ``run`` will not log (:func:`~optiflow.metrics.check_final_metric`)."""
    check_final_metric("--metric", metric, produced_metric_names(run), len(run.splits.x_val) > 0, run.metrics_declared)


def _open(run: Run, pm: PluginManager, names: RunPlugins, resume: str | None, parent_run_id: str | None,
          extra_tags: dict[str, str] | None, extra_params: dict[str, Any],
          ) -> tuple[Tracker | NullTracker, dict[str, Any] | None, distributed.Cluster]:
    """Open the run's MLflow run (rank 0 only; ``resume`` reopens it) once the plugins and the checkpoint to
    resume from accept it: a refusal on any process stops every process before a run opens.  Returns the
    tracker, the checkpoint and the process group."""
    config = run.config
    with _agreeing():
        _check_run(run, pm, names)
        heartbeat.check_settings()
        tracker = Tracker(config.tracking_uri, config.experiment) if distributed.is_main_process() else NullTracker()
        state = None
        if resume is not None:
            uri = resolve_tracking_uri(config.tracking_uri)
            store = client(uri)
            checkpoints.check_resumable(store, uri, resume)
            state = checkpoints.load(store, resume)
            checkpoints.restore(run, state)  # a checkpoint that does not fit is refused before the run reopens
    distributed.agree(None)  # every process's inputs are sound (a bad one stops all, before any run opens)
    cluster = distributed.join(run.device)
    if state is None:  # a new run opens with its setup: parameters and data digest (one write on a SQL store)
        tracker.log_params(setup_params(run, extra_params), flush=False)
        tracker.set_tags({digest.DATA_TAG: data_digest(run)})
    tracker.start(run_name=config.run_name or default_run_name(run), tags=extra_tags,
                  parent_run_id=parent_run_id, run_id=resume)  # the heartbeat is written with it
    run.tracker = tracker
    return tracker, state, cluster


def _begin(run: Run, pm: PluginManager, state: dict[str, Any] | None) -> int | None:
    """Log the run's setup files (or mark it resumed, the metrics queued in its checkpoint written by the process
    that logs) and start it; returns the epoch it resumes from."""
    if state is None:
        _log_setup(run)
    else:
        run.checkpoint = state
        if isinstance(run.tracker, Tracker):  # the other data-parallel processes hold a NullTracker
            checkpoints.relog(run.tracker, state)
        run.tracking.delete_tag("failure")
        run.tracking.set_tags({"optiflow.resumed_from_epoch": run.epoch})
    resumed_from = run.epoch if state is not None else None
    pm.hook.optiflow_run_start(run=run)
    if state is not None:
        checkpoints.restore_rng(run, state)
    return resumed_from


@host.imports_ahead()
def end_run(run: Run, pm: PluginManager,
            finish: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
    """A run that trained to its end: FINISHED for ``optiflow_run_end``, then its test metrics (and the predictions
    for ``optiflow_test_end``, when a plugin implements it), handed to ``finish`` (which logs them and the model).

    When ``optiflow_test_end`` raises, ``finish`` still gets the test metrics, then the error goes on: the run ends
    FAILED (a hook failed; a FINISHED run would be reused without the hook's output) yet nothing trained is lost."""
    run.status = "FINISHED"
    pm.hook.optiflow_run_end(run=run, status="FINISHED")
    if not pm.hook.optiflow_test_end.get_hookimpls():
        metrics = evaluate(run, run.splits.x_test, run.splits.y_test, "test")
    else:
        metrics, predictions = score(run, run.splits.x_test, run.splits.y_test, "test")
        try:
            pm.hook.optiflow_test_end(run=run, metrics=metrics, predictions=predictions)
        except Exception:
            if finish is not None:
                finish(metrics)
            raise
    if finish is not None:
        finish(metrics)
    return metrics


def default_run_name(run: Run) -> str:
    """``<model>-<opt>-<sched>-<data>`` (``cnn-adam-plateau-digits``), leaving out a ``none`` scheduler."""
    names = [run.plan.model[0].name, run.plan.opt[0].name, run.plan.sched[0].name, run.plan.data[0].name]
    return "-".join(name for name in names if name != "none")


@contextlib.contextmanager
def _agreeing() -> Iterator[None]:
    """An error in the block is this process's verdict for :func:`distributed.agree` (then raised)."""
    try:
        yield
    except Exception as exc:
        distributed.agree(exc)
        raise


@contextlib.contextmanager
def per_run_plugins(run: Run, pm: PluginManager) -> Iterator[RunPlugins]:
    """Register the run's ``--reg`` objects as plugins for as long as the run lasts; yields
    ``{plugin name: (the plugin that registered the regularizer, "regularizer 'x'")}`` for naming them in errors."""
    names = {f"{c.name}@{id(run):x}#{i}": (c.plugin, f"regularizer '{c.name}'") for i, (c, _) in enumerate(run.plan.reg)}
    try:
        for name, regularizer in zip(names, run.regularizers):
            pm.register(regularizer, name=name)
        yield names
    finally:
        for name in names:
            if pm.get_plugin(name) is not None:
                pm.unregister(name=name)


def _check_run(run: Run, pm: PluginManager, names: RunPlugins) -> None:
    """Before any run is logged: the metrics the run will produce (``optiflow_metric_names``), the scheduler's
    monitored metric among them, and ``optiflow_check_run``, where plugins refuse combinations they cannot work with."""
    validation = len(run.splits.x_val) > 0
    try:
        declared = pm.hook.optiflow_metric_names(run=run)
        run.metric_names = frozenset(epoch_metric_names(run.task, validation)).union(*map(list, declared))
        tested = evaluation_metric_names(run.task, "test") if len(run.splits.x_test) else []
        run.final_metric_names = run.metric_names.union(*map(list, pm.hook.optiflow_epoch_metric_names(run=run)),
                                                        tested, ["train_seconds"])
        run.metrics_declared = not adds_undeclared_metrics(pm)
        if run.schedule.monitor is not None:
            check_monitor(f"scheduler '{run.plan.sched[0].name}'", run.schedule.monitor, run.metric_names, validation)
        pm.hook.optiflow_check_run(run=run)
    except OptiflowError:
        raise
    except Exception as exc:
        plugin, hook = culprit(pm, exc) or ("?", "optiflow_check_run")
        raise PluginError(f"{blame(names, plugin, hook)}: {type(exc).__name__}: {first_line(exc)}",
                          owner(names, plugin)) from exc


def _record_failure(run: Run, pm: PluginManager, reporter: Reporter, exc: BaseException, names: RunPlugins,
                    outcome: Outcome) -> BaseException:
    """Say why the run did not finish (failure tag, traceback, checkpoint) before ``run_status`` ends it
    FAILED or KILLED; returns the error to raise, its message naming the run and how to resume it."""
    tracker = run.tracking
    reporter.stop()
    if isinstance(exc, RunKilled):
        run.status = run.status or "KILLED"
        tracker.set_tags({"killed": str(exc)})
        return exc
    if isinstance(exc, TrackingServerLost) and run.checkpoint is not None:  # the run cannot be written to
        folder = checkpoints.keep_locally(str(tracker.run_id), run.checkpoint, run.config.to_yaml())
        return type(exc)(f"{exc}; checkpoint of epoch {run.checkpoint['epoch']} and config.yaml kept in {folder}")
    if isinstance(exc, ServiceLost):
        return exc  # its study is gone, or the run cannot be written to: say so, nothing more
    interrupted = isinstance(exc, KeyboardInterrupt)
    status = "KILLED" if interrupted else "FAILED"
    reason, where = failure_reason(pm, exc, names, stepped_parts(run.plan, run.optimizer, run.schedule))
    outcome.failure = reason  # run_status tags the run with it as it ends the run
    saved = ""
    if run.status is None:
        run.status = status
        with contextlib.suppress(Exception):
            pm.hook.optiflow_run_end(run=run, status=status)
    try:
        if not isinstance(exc, OptiflowError):
            tracker.log_text("".join(traceback.format_exception(exc)), "failure.txt")
        # a full disk keeps the last checkpoint whole; only the process that logs (a Tracker) saves one
        if run.checkpoint is not None and isinstance(tracker, Tracker) and not isinstance(exc, DiskFull):
            if not run.wants_artifacts:
                tracker.log_text(run.config.to_yaml(), "config.yaml")  # what --resume reads
            checkpoints.save(tracker, run.checkpoint)
            saved = (f"; checkpoint of epoch {run.checkpoint['epoch']} saved, "
                     f"{resume_hint(run.config, str(tracker.run_id), run.role)}")
    except DiskFull as full:
        if not isinstance(exc, OptiflowError):
            raise full from exc  # the disk filled up while saying why: the full disk is what the user must fix
        saved = "; no checkpoint saved: the disk is full"
    message = f"{reason} (run {tracker.run_id} ended {status}{saved})"
    if interrupted:
        return RunInterrupted(getattr(exc, "signum", signal.SIGINT), message)
    if where is not None:
        return PluginError(message, where[0])
    if isinstance(exc, OptiflowError):
        error = type(exc)(message)
        error.exit_code = exc.exit_code
        return error
    note = f"run {tracker.run_id} ended FAILED; its traceback is the failure.txt artifact"
    noted: Any = exc  # BaseException.add_note() is Python 3.11+
    noted.__notes__ = [*getattr(exc, "__notes__", []), note]
    return exc


def failure_reason(pm: PluginManager, exc: BaseException, names: RunPlugins | None = None,
                   parts: list[tuple[str, str, str]] | None = None) -> tuple[str, tuple[str, str] | None]:
    """Why a training did not finish, in one line, and the ``(plugin, hook)`` that raised, if a plugin did
    (``names`` names per-run plugins), or ``(plugin, "optimizer 'x'")`` when one of ``parts`` did (:func:`stepped_parts`)."""
    if isinstance(exc, KeyboardInterrupt):
        return (str(exc) if isinstance(exc, RunInterrupted) else "interrupted by SIGINT"), None
    reason = str(exc) if isinstance(exc, OptiflowError) else f"{type(exc).__name__}: {first_line(exc)}"
    where = culprit(pm, exc, parts or ())
    if where is not None:
        reason = f"{blame(names or {}, *where)}: {reason}"
        where = (owner(names or {}, where[0]), where[1])
    return reason, where


def training_error(pm: PluginManager, exc: Exception, context: str,
                   parts: list[tuple[str, str, str]] | None = None) -> Exception:
    """The error a training that has no MLflow run of its own raises for ``exc``: an OptiflowError as it is,
    a plugin's failure (a hook, one of ``parts``) as a PluginError naming the plugin, a bug unchanged; ``context``
    says where."""
    reason, where = failure_reason(pm, exc, parts=parts)
    if where is not None:
        return PluginError(f"{reason} ({context})", where[0])
    if isinstance(exc, OptiflowError):
        exc.args = (f"{exc} ({context})",)
    return exc


def _log_setup(run: Run) -> None:
    """The config and the normalizer (``run.wants_artifacts``); the parameters (:func:`setup_params`) and the
    data digest went in with the run as it opened (:func:`_open`)."""
    tracker = run.tracking
    if not run.wants_artifacts:
        return
    tracker.log_text(run.config.to_yaml(), "config.yaml")
    fitted = getattr(run.normalizer, "state", None)
    state = fitted() if fitted is not None else {}
    if state:
        tracker.log_text(json.dumps(_jsonable(state), indent=2), "normalization.json")


def setup_params(run: Run, extra_params: dict[str, Any]) -> dict[str, Any]:
    """The parameters a run logs: its plan, data sizes, resolved computing decisions and ``extra_params``."""
    params = run.plan.params()
    params.update({f"data.n_{k}": v for k, v in run.splits.sizes().items()})
    params["data.input_shape"] = list(run.splits.x_train.shape[1:])
    params["model.parameters"] = sum(p.numel() for p in run.model.parameters())
    params["device_type"] = run.device.type
    params["channels_last"] = run.setup.channels_last
    params["cpu_threads"] = run.setup.threads or "default"
    params.update(distributed.current().params())  # world_size, nnodes: --batch-size is per process
    return {**params, **extra_params}


def _finish(run: Run, test: dict[str, float], log_model: bool, ahead: export.Ahead | None = None) -> None:
    """Test metrics, the learning curves (``run.wants_artifacts``) and (``log_model``) the model (traced ``ahead``?),
    on the finished run.  The test metrics are written before the files: a process killed while it exports keeps them."""
    run.tracking.log_metrics(test, step=run.epoch, flush=log_model or run.wants_artifacts)
    run.tracking.set_tags({digest.WEIGHTS_TAG: digest.weights_digest(run.model)})
    if run.wants_artifacts:
        _log_curves(run)
    if log_model:
        export.log_model(run, ahead)
    run.tracking.collect_figures()  # drawn meanwhile (optiflow.drawing)


def data_digest(run: Run) -> str:
    """SHA-256 of the run's splits as trained and scored on (after the split and the normalizer)."""
    return digest.tensors_digest(zip(("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"),
                                     run.splits.tensors()))


def components_title(run: Run) -> str:
    """What a run's pictures are of: its dataset, model and optimizer, and every other component set to other
    than its slot's default (scheduler, regularizers, augmentations, loss, normalizer, initializer), as given."""
    from optiflow.slots import SLOTS

    parts = []
    for slot in SLOTS:
        value = getattr(run.config, slot.key)
        for spec in value if slot.repeatable else [value]:
            if spec is not None and (slot.key in ("data", "model", "opt") or spec.name != slot.default):
                parts.append(str(spec))
    return " / ".join(parts) + f"  (lr {run.lr:g})"


def _log_curves(run: Run) -> None:
    recipe = drawing.Recipe("optiflow.plots:learning_curves", {"history": run.history, "title": components_title(run)})
    run.tracking.log_figure(recipe, "learning_curves.png")


def _jsonable(value: object) -> object:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.detach().cpu().tolist() if hasattr(value, "detach") else value.tolist()
    return value

