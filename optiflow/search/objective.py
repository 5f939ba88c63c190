"""The trials: Optuna's objective (one training, or K for cross-validation), each a child MLflow run,
run in this process and in ``--n-jobs`` worker processes."""

from __future__ import annotations

import dataclasses
import multiprocessing
import signal
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna

from optiflow import heartbeat, tracking
from optiflow.config import RunConfig
from optiflow.errors import OptiflowError, RunKilled, ServiceLost, TrainingError
from optiflow.forecast import Tick
from optiflow.metrics import final_metrics
from optiflow.run import RunResult, shared_data
from optiflow.search.folds import train_folds
from optiflow.search.space import short, trial_config
from optiflow.search.stopping import no_more_trials, stop_at_target, time_limit, trial_tick
from optiflow.search.study import SearchSettings, open_study
from optiflow.search.workers import (
    OVER_ATTR,
    REUSED_ATTR,
    RUN_ATTR,
    finished,
    over_total,
    total_callback,
    trial_runs_filter,
)


class TrialPruned(RunKilled, optuna.TrialPruned):
    """Optuna prunes the trial; the runner ends its MLflow run KILLED."""


class UnknownMetric(OptiflowError):
    """The objective metric is not among those the runs log: stops the study rather than failing each trial."""


def run_study(base: RunConfig, settings: SearchSettings, study: optuna.Study, parent_id: str, *,
              tags: dict[str, str] | None = None, progress: Callable[[str | Tick], Any] | None = None) -> None:
    """Run the study up to ``settings.n_trials`` finished trials in all (counting those already in it, from
    this command run earlier or other workers), with ``n_jobs - 1`` worker processes beside this one."""
    workers: list[Any] = []
    done = finished(study)
    remaining = settings.n_trials - done
    why = no_more_trials(study, settings) if remaining > 0 else (
        f"study '{study.study_name}' already has {done} finished trials "
        f"(--n-trials {settings.n_trials} is the study's total): no new trial")
    if why is not None:
        if progress is not None:
            progress(why)
        return
    try:
        _spawn_workers(workers, base, settings, study.study_name, parent_id, tags, remaining)
        share = _share(remaining, settings.n_jobs, 0)
        run_trials(base, settings, study, parent_id, share, tags=tags, progress=progress, total=settings.n_trials)
        for worker in workers:
            worker.join()
        if any(worker.exitcode != 0 for worker in workers):
            raise OptiflowError("a search worker process failed; see the failed trials in the study")
    finally:
        stopped = sys.exc_info()[1]  # Ctrl-C reached the workers too; a SIGTERM was this process's alone
        _stop_workers(workers, interrupted=isinstance(stopped, KeyboardInterrupt)
                      and getattr(stopped, "signum", signal.SIGINT) == signal.SIGINT)


WORKER_GRACE_SECONDS = 10.0


def _stop_workers(workers: list[Any], interrupted: bool) -> None:
    """Workers still running as this process stops: each is waited for, so that the study's temporary folder
    outlives them.  Interrupted by Ctrl-C (it reached them too), each ends its trial's run KILLED first; then (or
    else at once: a SIGTERM sent to this process, an error) what still runs is terminated, and killed after
    :data:`WORKER_GRACE_SECONDS` (each wait is for all workers together)."""
    if interrupted:
        _join_all(workers)
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    _join_all(workers)
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join()


def _join_all(workers: list[Any]) -> None:
    """Wait for the workers together, :data:`WORKER_GRACE_SECONDS` at most in all (not that long for each)."""
    deadline = time.monotonic() + WORKER_GRACE_SECONDS
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))


def run_trials(base: RunConfig, settings: SearchSettings, study: optuna.Study, parent_id: str, n_trials: int,
               *, tags: dict[str, str] | None = None, progress: Callable[[str | Tick], Any] | None = None,
               total: int | None = None) -> bool:
    """Optimize at most ``n_trials`` trials of ``study`` in this process, each a child run of ``parent_id``,
    stopping early once the study holds ``total`` finished trials (None: no such stop), once a trial of the
    study reached ``--target`` or once ``--budget``/``--timeout`` is spent (:mod:`optiflow.search.stopping`).
    Returns False when it started none because of those."""
    if no_more_trials(study, settings) is not None:
        return False

    def objective(trial: optuna.Trial) -> float:
        if total is not None and over_total(study, trial, total):
            study.stop()
            raise TrainingError(trial.user_attrs["failure"])
        config, sampled = trial_config(base, settings.space, lambda dim: dim.suggest(trial))
        trial_tags = {**(tags or {}), "optuna.study_name": study.study_name, "optuna.trial_number": str(trial.number)}
        params = {"optuna.trial_number": trial.number, "optuna.sampler": settings.sampler,
                  "optuna.pruner": settings.pruner, **{f"trial.{k}": v for k, v in sampled.items()}}
        name = f"trial {trial.number}"
        try:
            if settings.cv:
                value = _cross_validate(trial, config, settings, parent_id, name, trial_tags, params)
            else:
                result = _train_trial(trial, config.replace(run_name=name), settings, parent_id, trial_tags,
                                      params, offset=0, on_start=lambda run_id: trial.set_user_attr(RUN_ATTR, run_id),
                                      reuse=settings.reuse)
                if result.reused:
                    _reused(trial, [result], settings, str(result.run_id), config.epochs)
                value = _objective_value(final_metrics(result.metrics, result.history, result.seconds), settings.metric)
        except TrialPruned:
            trial.set_user_attr("mlflow_run_id", _child_run(base, parent_id, name, trial_tags, params, None))
            raise
        except (UnknownMetric, ServiceLost):
            raise
        except OptiflowError as exc:
            trial.set_user_attr("failure", str(exc)[:1000])
            trial.set_user_attr("mlflow_run_id", _child_run(base, parent_id, name, trial_tags, params, str(exc)))
            raise exc if isinstance(exc, TrainingError) else TrainingError(str(exc)) from None
        return value

    def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if progress is None or trial.user_attrs.get(OVER_ATTR):
            return
        shown = ", ".join(f"{k}={short(v)}" for k, v in trial.params.items())
        value = f"{settings.metric}={trial.value:.4g}" if trial.value is not None else trial.user_attrs.get("failure", "")
        reused = trial.user_attrs.get(REUSED_ATTR)
        shown += f"  (reused run {reused})" if reused else ""
        progress(trial_tick(study, trial, settings, f"trial {trial.number} {trial.state.name.lower()}: {value}  {shown}"))

    with warnings.catch_warnings(), shared_data():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        callbacks = [report, *([] if total is None else [total_callback(total)]), stop_at_target(settings)]
        study.optimize(objective, n_trials=n_trials, timeout=time_limit(settings), catch=(TrainingError,),
                       callbacks=[c for c in callbacks if c is not None], gc_after_trial=False)
    return True


def _train_trial(trial: optuna.Trial, config: RunConfig, settings: SearchSettings, parent_id: str | None,
                 tags: dict[str, str], params: dict[str, Any], offset: int,
                 on_start: Callable[[str], None] | None = None, role: str = "search-trial",
                 reuse: bool = False) -> RunResult:
    """One training reporting its per-epoch metric to the pruner (step ``offset + epoch``); ``role``: a trial
    or a fold of one; ``reuse``: the finished run of the same key instead, if there is one."""
    from optiflow.training import train

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        value = metrics.get(settings.metric)
        if value is None or settings.pruner == "none":
            return
        trial.report(value, offset + epoch)
        if trial.should_prune():
            raise TrialPruned(f"pruned by optuna ({settings.pruner}) after epoch {epoch}: "
                              f"{settings.metric}={value:.4g}")

    return train(config, parent_run_id=parent_id, extra_tags=tags, extra_params=params, on_epoch=on_epoch,
                 log_model=settings.log_models, artifacts=settings.child_artifacts, on_start=on_start,
                 role=role, reuse=reuse)


def _reused(trial: optuna.Trial, results: list[RunResult], settings: SearchSettings, run_id: str,
            epochs: int) -> None:
    """Record on ``trial`` that it reused the finished runs ``results`` (its run: ``run_id``) and report their
    per-epoch metric to the pruner as if they had trained in it (fold k at steps after fold k-1's ``epochs``)."""
    trial.set_user_attr(RUN_ATTR, run_id)
    trial.set_user_attr(REUSED_ATTR, ",".join(str(result.run_id) for result in results))
    for fold, result in enumerate(results):
        _report(trial, result, settings, fold * epochs)


def _report(trial: optuna.Trial, result: RunResult, settings: SearchSettings, offset: int) -> None:
    """A reused run's per-epoch objective metric, reported to the pruner at steps ``offset + epoch``."""
    if settings.pruner != "none":
        for epoch, value in enumerate(result.history.get(settings.metric, []), 1):
            trial.report(value, offset + epoch)


def _reusable_folds(configs: list[RunConfig], settings: SearchSettings) -> list[RunResult | None]:
    """For each fold, the finished run of its key holding what it would log (None: to train; all None without
    ``settings.reuse``)."""
    from optiflow.plugins import get_registry
    from optiflow.reuse import finished_run, outputs, planned_key

    if not settings.reuse:
        return [None] * len(configs)
    held = outputs(artifacts=settings.child_artifacts, log_model=settings.log_models, config=configs[0])
    return [finished_run(config, planned_key(config, get_registry()), held) for config in configs]


def _cross_validate(trial: optuna.Trial, config: RunConfig, settings: SearchSettings, parent_id: str, name: str,
                    tags: dict[str, str], params: dict[str, Any]) -> float:
    """K trainings, fold k validating on fold k of the training split; the trial's run holds the folds."""
    from optiflow.reuse import reused_tags
    from optiflow.tracking import Tracker, run_status

    configs = [config.replace(cv_folds=settings.cv, cv_fold=fold, run_name=f"{name} fold {fold}")
               for fold in range(settings.cv)]
    found = _reusable_folds(configs, settings)
    if all(found):
        reused = [result for result in found if result is not None]
        _reused(trial, reused, settings, _parent_of(config, str(reused[0].run_id)), config.epochs)
        return statistics.fmean(_objective_value(final_metrics(r.metrics, r.history, r.seconds), settings.metric) for r in reused)
    tracker = Tracker(config.tracking_uri, config.experiment)
    tracker.log_params({**params, "cv_folds": settings.cv}, flush=False)  # written with the run as it opens
    tracker.start(run_name=name, tags={**tags, "optiflow.kind": "cross-validation"}, parent_run_id=parent_id)
    scores: list[float] = []
    histories: list[dict[str, list[float]]] = []
    with run_status(tracker), heartbeat.beating(tracker):
        trial.set_user_attr(RUN_ATTR, tracker.run_id)
        if settings.child_artifacts:
            tracker.log_text(config.to_yaml(), "config.yaml")
        if any(found):
            tracker.set_tags(reused_tags({f"fold {f}": str(r.run_id) for f, r in enumerate(found) if r}, settings.cv,
                                         "folds"))
        fold_tags = [{**tags, "optiflow.cv_fold": str(fold)} for fold in range(settings.cv)]
        fold_params = {"optuna.trial_number": trial.number}
        missing = [fold for fold, result in enumerate(found) if result is None]
        stacked: dict[int, RunResult] = {}
        if settings.pruner == "none" and not settings.child_artifacts and not settings.log_models:
            trained = train_folds([configs[f] for f in missing], parent_run_id=str(tracker.run_id),
                                  tags=[fold_tags[f] for f in missing], params=fold_params)
            stacked = dict(zip(missing, trained or []))
        for fold in range(settings.cv):
            result = found[fold] or stacked.get(fold) or _train_trial(
                trial, configs[fold], settings, tracker.run_id, fold_tags[fold], fold_params,
                offset=fold * config.epochs, role="cv-fold")
            if result.reused:
                _report(trial, result, settings, fold * config.epochs)
            scores.append(_objective_value(final_metrics(result.metrics, result.history, result.seconds), settings.metric))
            histories.append(result.history)
            tracker.log_metrics({f"cv_{settings.metric}": scores[-1]}, step=fold + 1, flush=False)
        for epoch in range(min(len(h.get("train_loss", [])) for h in histories)):
            keys = set.intersection(*(set(h) for h in histories))
            tracker.log_metrics({k: statistics.fmean(h[k][epoch] for h in histories) for k in keys}, step=epoch + 1,
                                flush=False)
        value = statistics.fmean(scores)
        tracker.log_metrics({f"cv_{settings.metric}_mean": value, f"cv_{settings.metric}_std": statistics.pstdev(scores)},
                            flush=False)  # written as run_status ends the run, in the same transaction
        return value


def _parent_of(config: RunConfig, run_id: str) -> str:
    """The run that holds fold run ``run_id`` (its trial's cross-validation run), else the fold run itself."""
    from optiflow.tracking import client, resolve_tracking_uri, retry

    return retry(client(resolve_tracking_uri(config.tracking_uri)).get_run, run_id).data.tags.get(
        "mlflow.parentRunId", run_id)


def _objective_value(metrics: dict[str, float], metric: str) -> float:
    if metric not in metrics:
        raise UnknownMetric(f"the runs produce no metric '{metric}'; available: {', '.join(sorted(metrics))}")
    return metrics[metric]


def _child_run(base: RunConfig, parent_id: str, name: str, tags: dict[str, str], params: dict[str, Any],
               failure: str | None) -> str:
    """The id of a trial's child run; a trial that failed before its run started gets a FAILED one saying why."""
    from optiflow.tracking import Tracker, retry, run_status

    tracker = Tracker(base.tracking_uri, base.experiment)
    query = trial_runs_filter(parent_id, tags["optuna.trial_number"])
    found = retry(tracker.client.search_runs, [tracker.experiment_id], query, max_results=1)
    if found or failure is None:
        return found[0].info.run_id if found else "-"
    run_id = tracker.start(run_name=name, tags={**tags, "failure": failure[:5000]}, parent_run_id=parent_id)
    with run_status(tracker) as outcome:
        outcome.status, outcome.failure = "FAILED", failure
        tracker.log_params(params)
    return run_id


def _share(n_trials: int, n_jobs: int, index: int) -> int:
    return n_trials // n_jobs + (index < n_trials % n_jobs)


def _spawn_workers(workers: list[Any], base: RunConfig, settings: SearchSettings, study_name: str, parent_id: str,
                   tags: dict[str, str] | None, remaining: int) -> None:
    """``n_jobs - 1`` extra processes (separate processes, so per-run plugins never cross runs), each added to
    ``workers`` as it starts (those started are stopped with the search when a later one cannot start)."""
    context = multiprocessing.get_context("spawn")
    for index in range(1, settings.n_jobs):
        share = _share(remaining, settings.n_jobs, index)
        if share:
            worker = context.Process(target=_worker, daemon=True,
                                     args=(base, settings, study_name, parent_id, share, tags, tracking.CLI_ARGS))
            # the worker starts with SIGINT blocked (a mask survives exec), so Ctrl-C while it imports waits
            # for _worker, where it is one quiet exit; this process gets its own at once after the start
            held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                worker.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
            workers.append(worker)


def _worker(base: RunConfig, settings: SearchSettings, study_name: str, parent_id: str, n_trials: int,
            tags: dict[str, str] | None, cli_args: list[str] | None) -> None:
    """A worker process's trials.  Ctrl-C (SIGINT to the whole process group) or the command's SIGTERM end
    the trial's run KILLED, then the worker quietly: the command says it in one line, not each worker."""
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # held back while it started
        _work(base, settings, study_name, parent_id, n_trials, tags, cli_args)
    except KeyboardInterrupt:
        sys.exit(130)


def _work(base: RunConfig, settings: SearchSettings, study_name: str, parent_id: str, n_trials: int,
          tags: dict[str, str] | None, cli_args: list[str] | None) -> None:
    tracking.CLI_ARGS = cli_args  # its runs' optiflow.command is the command that spawned it
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = open_study(base, dataclasses.replace(settings, study_name=study_name))
    parent = tracking.Tracker(base.tracking_uri, base.experiment)
    parent.run_id = parent_id
    with heartbeat.beating(parent):  # the parent lives while any of its workers does
        run_trials(base, settings, study, parent_id, n_trials, tags=tags, total=settings.n_trials)
