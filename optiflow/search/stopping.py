"""When a search stops starting trials, and why: its ``--n-trials`` total, a ``--target`` value of the objective
that a finished trial reached, a ``--budget`` of wall time, a ``--timeout``, or an interrupt.

Every check reads the study's trials from its storage, so a target one worker reaches stops every worker
sharing ``--storage`` after the trial each has in flight; a trial in flight when the budget ends finishes (or
is pruned): Optuna's ``timeout`` only keeps the next trial from starting.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import optuna

from optiflow.errors import OptiflowError
from optiflow.forecast import Tick, eta
from optiflow.search.space import short
from optiflow.search.study import SearchSettings
from optiflow.search.workers import OVER_ATTR, REUSED_ATTR, finished
from optiflow.values import duration_text

#: the parent run's tags saying why the study stopped (one of :data:`REASONS`) and how
REASON_TAG, DETAIL_TAG = "stop_reason", "stop_detail"
REASONS = ("trials", "target", "budget", "timeout", "interrupted")
COMPLETE = optuna.trial.TrialState.COMPLETE


@dataclass(frozen=True)
class Stop:
    """Why a study stopped starting trials (``reason``, one of :data:`REASONS`), in a line (``detail``)."""

    reason: str
    detail: str
    #: the trial that reached ``--target``, for reason "target"
    trial: int | None = None


def parse_target(text: object, metric: str | None) -> tuple[str, float]:
    """``--target METRIC=VALUE`` (or a bare VALUE of the objective) as (metric, value); the metric must be the
    objective ``metric`` when one is given (None: the target's metric becomes the objective; a bare VALUE is
    then a value of the default objective, :attr:`SearchSettings.metric`)."""
    name, sep, value = str(text).strip().rpartition("=")
    name = name.strip() if sep else (metric or SearchSettings.metric)
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not name or not math.isfinite(number):
        raise OptiflowError(f"--target expects METRIC=VALUE with a finite number (e.g. val_accuracy=0.98), got '{text}'")
    if metric is not None and name != metric:
        raise OptiflowError(f"--target names {name} but the objective (--metric) is {metric}: a target is a value of "
                            f"the objective; drop --metric or give --target {metric}=VALUE")
    return name, number


def reaches(settings: SearchSettings, value: float | None) -> bool:
    """Whether an objective ``value`` reaches ``settings.target`` in the study's direction."""
    if settings.target is None or value is None or math.isnan(value):
        return False
    return value >= settings.target if settings.direction == "maximize" else value <= settings.target


def target_trial(study: optuna.Study, settings: SearchSettings) -> optuna.trial.FrozenTrial | None:
    """The first trial (by completion) whose objective reached ``--target``, by any worker; None if none did."""
    if settings.target is None:
        return None
    hits = [t for t in study.get_trials(deepcopy=False, states=(COMPLETE,)) if reaches(settings, t.value)]
    return min(hits, key=lambda t: (t.datetime_complete or datetime.max, t.number), default=None)


def stop_at_target(settings: SearchSettings) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None:
    """A callback stopping this worker's ``optimize`` once a trial of the study (anyone's) reached the target."""
    if settings.target is None:
        return None

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if target_trial(study, settings) is not None:
            study.stop()

    return callback


def time_limit(settings: SearchSettings, now: float | None = None) -> float | None:
    """Optuna's ``timeout`` for this ``optimize`` call: ``--timeout``, cut to what is left of ``--budget``
    (``settings.deadline``, wall-clock seconds); None without either."""
    limits = [float(settings.timeout)] if settings.timeout is not None else []
    if settings.deadline is not None:
        limits.append(settings.deadline - (time.time() if now is None else now))
    return min(limits) if limits else None


def no_more_trials(study: optuna.Study, settings: SearchSettings) -> str | None:
    """Why this worker starts no trial now (the target was reached, the budget is spent), None when it may."""
    hit = target_trial(study, settings)
    if hit is not None:
        return f"trial {hit.number} reached the target {settings.metric}={settings.target:g}: no new trial"
    left = time_limit(settings)
    if left is not None and left <= 0:
        return "the budget is spent: no new trial" if settings.deadline is not None else None
    return None


def stop_reason(study: optuna.Study, settings: SearchSettings, elapsed: float, now: float | None = None) -> Stop:
    """Why the study stopped, from its trials in storage and the time: the target first, then the trials'
    total, the budget's deadline, this process's ``elapsed`` seconds against ``--timeout``; else the trials
    this process was given ran (some failed, or other workers hold the rest)."""
    now = time.time() if now is None else now
    hit = target_trial(study, settings)
    if hit is not None:
        return Stop("target", f"trial {hit.number} reached {settings.metric}={hit.value:.4g} "
                              f"(target {settings.target:g})", hit.number)
    done = finished(study)
    if done >= settings.n_trials:
        return Stop("trials", f"{done} finished trials (--n-trials {settings.n_trials})")
    if settings.deadline is not None and now >= settings.deadline:
        return Stop("budget", f"the budget of {duration_text(settings.budget or 0)} ran out after {done} "
                              f"finished trials")
    if settings.timeout is not None and elapsed >= settings.timeout:
        return Stop("timeout", f"--timeout {settings.timeout:g} s passed after {done} finished trials")
    failed = sum(not t.user_attrs.get(OVER_ATTR)  # a trial asked for over --n-trials was never run
                 for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)))
    return Stop("trials", f"{done} finished trials" + (f" and {failed} failed" if failed else ""))


def trial_tick(study: optuna.Study, trial: optuna.trial.FrozenTrial, settings: SearchSettings, what: str) -> Tick:
    """Where the study stands after ``trial`` (``what`` says how it ended): finished trials of the total, the
    trial's seconds, the ETA from every trained trial's measured time (a pruned one counted as what it cost, a
    reused score left out; cut to what is left of the budget) and the best trial so far with its parameters."""
    trials = study.get_trials(deepcopy=False)
    durations = [t.duration.total_seconds() for t in trials  # a reused score cost nothing: not a trial's time
                 if t.state.is_finished() and t.duration is not None and not t.user_attrs.get(REUSED_ATTR)
                 and not t.user_attrs.get(OVER_ATTR)]
    running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
    done = sum(t.state in (COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    left = eta(durations, settings.n_trials - done, parallel=max(settings.n_jobs, 1 + running))
    limit = time_limit(settings) if settings.deadline is not None else None
    if left is not None and limit is not None:
        left = max(0.0, min(left, limit))
    best = None
    if any(t.state == COMPLETE for t in trials):
        top = study.best_trial
        shown = ", ".join(f"{k}={short(v)}" for k, v in top.params.items())
        best = f"{settings.metric}={top.value:.4g} (trial {top.number}{': ' + shown if shown else ''})"
    seconds = trial.duration.total_seconds() if trial.duration is not None else 0.0
    return Tick(done, settings.n_trials, what, seconds, left, best)
