"""``optiflow search``: hyper-parameter search on Optuna, one parent MLflow run per study, a child per trial."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import optuna
import yaml

from optiflow import host
from optiflow.config import RunConfig
from optiflow.errors import OptiflowError, redact
from optiflow.metrics import higher_is_better
from optiflow.run import shared_data
from optiflow.search.objective import run_study, run_trials
from optiflow.search.refit import refit
from optiflow.search.space import Dimension, Scalar, describe_dimension, parse_space, short, trial_config
from optiflow.search.stopping import DETAIL_TAG, REASON_TAG, parse_target, stop_reason
from optiflow.search.study import (
    PRUNERS,
    SAMPLERS,
    SearchSettings,
    given_defaults,
    make_pruner,
    make_sampler,
    open_study,
    parse_component,
    shared_parent_run,
)
from optiflow.search.summary import SearchResult, log_plots_drawn, summarize
from optiflow.search.workers import settle, storage_lost
from optiflow.stores import run_imports
from optiflow.values import parse_duration

if TYPE_CHECKING:
    from optiflow.forecast import Tick
    from optiflow.tracking import Tracker


def search(base: RunConfig, settings: SearchSettings, *, tags: dict[str, str] | None = None,
           progress: Callable[[str | Tick], Any] | None = None) -> SearchResult:
    """Run (or join) the study and map it onto MLflow; returns the study's summary.

    The parent run stays open when this process finishes while others still run trials: the last one ends it,
    and refits the best configuration first (``settings.refit``; see :mod:`optiflow.search.refit`).
    ``progress`` gets a line (a str) or a finished trial (a :class:`~optiflow.forecast.Tick`).
    """
    started = time.monotonic()
    if settings.budget is not None:
        settings = dataclasses.replace(settings, deadline=time.time() + settings.budget)
    validate(base, settings)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    temporary = None
    if settings.n_jobs > 1 and settings.storage is None:
        temporary = tempfile.TemporaryDirectory(prefix="optiflow-study-")
        settings = dataclasses.replace(settings, storage=f"journal:{temporary.name}/study.log")
    try:
        with quiet_heartbeat_threads():
            return _search(base, settings, tags, progress, started)
    except Exception as exc:
        lost = storage_lost(exc, settings.storage)
        if lost is None:
            raise
        raise lost from None
    finally:
        if temporary is not None:
            temporary.cleanup()


def _search(base: RunConfig, settings: SearchSettings, tags: dict[str, str] | None,
            progress: Callable[[str | Tick], Any] | None, started: float) -> SearchResult:
    from optiflow import heartbeat
    from optiflow.tracking import Tracker, run_status

    study = open_study(base, settings)
    tracker = Tracker(base.tracking_uri, base.experiment)
    parent_id = shared_parent_run(study, settings.storage is not None,
                                  lambda: _create_parent(tracker, base, settings, study.study_name, tags))
    tracker.start(run_id=parent_id)
    tracker.prepare_figures()  # the helper that draws the study's plots imports matplotlib while trials train
    interrupted = False
    with run_status(tracker) as outcome, shared_data(), heartbeat.beating(tracker):
        try:
            run_study(base, settings, study, parent_id, tags=tags, progress=progress)
            settle(study, lambda queued: run_trials(base, settings, study, parent_id, queued, tags=tags,
                                                    progress=progress), progress)
        except KeyboardInterrupt:
            interrupted = True
            with contextlib.suppress(Exception):
                tracker.set_tags({REASON_TAG: "interrupted", DETAIL_TAG: "interrupted (Ctrl-C or SIGTERM)"})
            raise
        finally:  # the plots are drawn beside the search meanwhile; none when it was interrupted: it ends at once
            result = summarize(tracker, study, settings, plots=not interrupted)
        try:
            if any(t.state == optuna.trial.TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
                outcome.status = None  # another worker holds a trial: the last one refits and ends the parent
                return result
            result.stop = stop_reason(study, settings, time.monotonic() - started)
            tracker.set_tags({REASON_TAG: result.stop.reason, DETAIL_TAG: result.stop.detail})
            if not any(t.state.is_finished() for t in study.get_trials(deepcopy=False)):
                result.none_completed = f"{_ENDED.get(result.stop.reason, 'the search')} ended before any trial finished"
            if result.none_completed:
                outcome.status = "FAILED"
                tracker.set_tags({"failure": result.none_completed[:5000]})
            elif settings.refit:
                result.refit = refit(base, settings, study, tracker, tags=tags, progress=progress)
        finally:
            log_plots_drawn(tracker)
    return result


@contextlib.contextmanager
def quiet_heartbeat_threads() -> Iterator[None]:
    """A trial's heartbeat thread that loses the database ends without a traceback: the search's own next
    call to the database fails too and says so in one line."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.thread is not None and args.thread is not threading.main_thread() and args.exc_value is not None \
                and storage_lost(args.exc_value, None) is not None:
            return
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def settings_from(values: dict[str, Any], base: RunConfig) -> SearchSettings:
    """Search settings from flags and ``--config`` values, validated and with the defaults of
    :func:`~optiflow.search.study.given_defaults` filled in."""
    if values.get("budget") is not None:
        _budget(values["budget"])  # an empty --budget '' is refused, not read as no budget
    given = {**given_defaults(), "refit": True, "register": None, "reuse": True,
             **{key: value for key, value in values.items() if value is not None and value != ""}}
    space = parse_space(given["space"] or (), base)
    sampler, sampler_options = parse_component(str(given["sampler"]), SAMPLERS, "sampler")
    pruner, pruner_options = parse_component(str(given["pruner"]), PRUNERS, "pruner")
    metric, target = given["metric"], None
    if given["target"] is not None:
        metric, target = parse_target(given["target"], metric)
    metric = str(metric or SearchSettings.metric)
    n_trials = given["n_trials"]
    if n_trials is None:
        n_trials = math.prod(len(dim.grid()) for dim in space) if sampler == "grid" else SearchSettings.n_trials
    return SearchSettings(
        space=space, sampler=sampler, sampler_options=sampler_options, sampler_seed=given["sampler_seed"],
        pruner=pruner, pruner_options=pruner_options, metric=metric,
        direction=str(given["direction"] or default_direction(metric)), n_trials=int(n_trials),
        timeout=given["timeout"], target=target, budget=_budget(given["budget"]), cv=int(given["cv"]),
        storage=given["storage"], study_name=given["study_name"],
        n_jobs=int(given["n_jobs"]), log_models=bool(given["log_models"]),
        child_artifacts=bool(given["child_artifacts"]), heartbeat=int(given["heartbeat"]),
        refit=given["refit"] is not False, register=str(given["register"]) if given["register"] else None,
        reuse=given["reuse"] is not False,
    )


#: who ended a search that finished no trial, by its stop reason
_ENDED = {"budget": "the budget", "timeout": "the --timeout"}


def _budget(value: object) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError:
        raise OptiflowError(f"--budget expects a wall time > 0 such as 90s, 30m, 2h or 1h30m, got '{value}'") from None


def default_direction(metric: str) -> str:
    return "maximize" if higher_is_better(metric) else "minimize"


def validate(base: RunConfig, settings: SearchSettings) -> None:
    """Check the space, sampler and pruner, and that every choice builds a run, before anything runs."""
    from optiflow import heartbeat
    from optiflow.plan import plan
    from optiflow.plugins import get_registry

    heartbeat.check_settings()
    if settings.n_trials is not None and settings.n_trials < 1:
        raise OptiflowError(f"--n-trials must be >= 1, got {settings.n_trials}")
    if settings.heartbeat < 0:
        raise OptiflowError(f"--heartbeat must be >= 0 seconds (0 turns heartbeats off), got {settings.heartbeat}")
    if not 1 <= settings.n_jobs <= 1024:
        raise OptiflowError(f"--n-jobs must be in [1, 1024], got {settings.n_jobs}")
    if settings.timeout is not None and not (math.isfinite(float(settings.timeout)) and float(settings.timeout) > 0):
        raise OptiflowError(f"--timeout must be a number of seconds > 0, got {settings.timeout}")
    if settings.cv == 1 or settings.cv < 0:
        raise OptiflowError(f"--cv needs at least 2 folds, got {settings.cv}")
    if settings.direction not in ("minimize", "maximize"):
        raise OptiflowError(f"--direction must be minimize or maximize, got '{settings.direction}'")
    if settings.register and not settings.refit:
        raise OptiflowError("--register registers the refit model: drop --no-refit")
    if settings.cv and not settings.metric.startswith("val_"):
        raise OptiflowError(f"with --cv the objective is a validation metric (val_loss, val_accuracy ...), "
                            f"not '{settings.metric}'")
    make_sampler(settings)
    make_pruner(settings, base.epochs)
    registry = get_registry()
    for dim in settings.space:
        for value in (dim.choices if dim.kind == "choice" else (dim.low, dim.high)):
            chosen = int(value) if dim.kind == "int" and isinstance(value, float) else value  # a range's bound

            def pick(d: Dimension, dim: Dimension = dim, chosen: Scalar = chosen) -> Scalar:
                return chosen if d is dim else d.first()

            try:
                plan(trial_config(base, settings.space, pick)[0], registry)
            except OptiflowError as exc:
                raise OptiflowError(f"--space {dim.name}={value}: {exc}") from None
    host.imports_done(ahead=run_imports(base.tracking_uri))  # the input checked, before any run exists
    _preflight_first_corner(base, settings)


def _preflight_first_corner(base: RunConfig, settings: SearchSettings) -> None:
    """A trial at the space's first corner (every choice's first value, every range's low bound) passes all that
    a training checks before its run opens, before the study's parent run opens (a monitored metric no trial
    produces, an augmentation the data cannot take ...)."""
    from optiflow.training import check_ranking_metric, preflight

    config, sampled = trial_config(base, settings.space, Dimension.first)
    if settings.cv:
        config = config.replace(cv_folds=settings.cv, cv_fold=0)
    try:
        run = preflight(config)
        check_ranking_metric(settings.metric, run)
    except OptiflowError as exc:
        where = ", ".join(f"{name}={short(value)}" for name, value in sampled.items())
        raise OptiflowError(f"a trial with {where}: {exc}" if where else str(exc)) from None


def _create_parent(tracker: Tracker, base: RunConfig, settings: SearchSettings, study_name: str,
                   tags: dict[str, str] | None) -> str:
    """Open the study's parent run (left open for :func:`search`; FAILED if logging its settings fails)."""
    from optiflow.tracking import run_status

    run_id = tracker.start(run_name=base.run_name or f"search {study_name}",
                           tags={**(tags or {}), "optiflow.kind": "search", "optuna.study_name": study_name})
    params = {"study_name": study_name, "sampler": settings.sampler, "pruner": settings.pruner,
              "metric": settings.metric, "direction": settings.direction, "cv": settings.cv, "refit": settings.refit,
              "storage": redact(settings.storage) if settings.storage else "in-memory"}
    params.update({key: value for key, value in (("target", settings.target), ("budget_seconds", settings.budget),
                                                 ("timeout", settings.timeout)) if value is not None})
    params.update({f"space.{d.name}": describe_dimension(d) for d in settings.space})
    params.update({f"sampler.{k}": v for k, v in settings.sampler_options.items()})
    params.update({f"pruner.{k}": v for k, v in settings.pruner_options.items()})
    with run_status(tracker) as outcome:
        outcome.status = None
        tracker.log_params(params)
        tracker.log_text(base.to_yaml(), "config.yaml")
        tracker.log_text(yaml.safe_dump({d.name: describe_dimension(d) for d in settings.space}, sort_keys=False),
                         "space.yaml")
    return run_id

