"""``--dry-run`` for ``compare`` and ``search``: the plan and, from one calibration epoch trained in this process
with nothing logged (no MLflow run, no store, no study storage, no output folder), an estimate of the total."""

from __future__ import annotations

import math
import statistics

from optiflow.commands.compare import plan_runs, preflight_variants
from optiflow.commands.search import validate
from optiflow.config import RunConfig
from optiflow.errors import redact
from optiflow.forecast import Forecast, calibrate, calibrate_stacked, estimate_runs
from optiflow.search.space import Dimension, Scalar, describe_dimension, trial_config
from optiflow.search.study import SearchSettings
from optiflow.values import duration_text


def compare_forecast(base: RunConfig, vary: dict[str, list[str]], repeats: int = 1,
                     metric: str | None = None, *, log_models: bool = False, reuse: bool = True) -> Forecast:
    """``compare --dry-run``: the runs it would train, those it would reuse (read from an existing store, nothing
    created) and, from one calibration epoch of the first variant (in this process, nothing logged), an estimate
    of the total time of the runs it would train."""
    from optiflow.plugins import get_registry
    from optiflow.reuse import finished_in_store, outputs

    runs = plan_runs(base, vary, repeats)
    preflight_variants(runs, metric)
    labels = list(dict.fromkeys(label for label, _ in runs))
    needed = outputs(artifacts=True, log_model=log_models, config=base)
    reused = finished_in_store([c for _, c in runs], needed, get_registry()) if reuse else [None] * len(runs)
    count = sum(found is not None for found in reused)
    lines = [f"{len(runs)} runs: {len(labels)} variants x {repeats} seed{'s' if repeats > 1 else ''}",
             *(f"  {label}" for label in labels),
             *([f"reused {count} of {len(runs)} runs: finished runs with the same content key, not trained"]
               if count else [])]
    calibration = calibrate(runs[0][1])
    epochs = [config.epochs for (_, config), found in zip(runs, reused) if found is None]
    return Forecast(lines, calibration, estimate_runs(calibration, epochs),
                    f"{len(epochs)} trainings of {statistics.fmean(epochs or [0]):g} epochs at variant {labels[0]}'s "
                    f"cost" + (f", {count} reused" if count else ""))


def search_forecast(base: RunConfig, settings: SearchSettings) -> Forecast:
    """``search --dry-run``: the study it would run and, from one calibration epoch at the space's middle (in
    this process, nothing logged, no store and no study storage touched), an estimate of the total time."""
    validate(base, settings)
    folds = max(settings.cv, 1)
    config, _ = trial_config(base, settings.space, _middle)
    calibration = calibrate(config.replace(cv_folds=settings.cv, cv_fold=0) if settings.cv else config)
    stacked = calibrate_stacked([config.replace(cv_folds=settings.cv, cv_fold=k) for k in range(folds)]) if (
        settings.cv and settings.pruner == "none" and not settings.child_artifacts and not settings.log_models) else None
    epochs = [int(round(_mean_value(d))) for d in settings.space if d.key == "epochs"] or [base.epochs]
    done = finished_before(settings)
    left = max(0, settings.n_trials - done)
    trainings = left * folds
    estimate = estimate_runs(stacked or calibration, epochs * (left if stacked else trainings),
                             settings.n_jobs) + (calibration.run_seconds(epochs[0]) if settings.refit else 0.0)
    limits = [s for s in (settings.timeout, settings.budget) if s is not None]
    capped = bool(limits) and min(limits) < estimate
    stops = [*([f"--target {settings.metric}={settings.target:g}"] if settings.target is not None else []),
             *([f"--budget {duration_text(settings.budget)}"] if settings.budget is not None else [])]
    lines = [f"{settings.n_trials} trials{f' x {folds} folds' if settings.cv else ''}"
             f"{f' ({done} already finished)' if done else ''} = {trainings} trainings, "
             f"{settings.n_jobs} at a time; sampler {settings.sampler}, pruner {settings.pruner}; "
             f"{settings.direction} {settings.metric}" + "".join(f"; stops at {s}" for s in stops),
             *(f"  {d.name} = {describe_dimension(d)}" for d in settings.space),
             f"study storage: {redact(settings.storage) if settings.storage else 'in memory'} "
             + (f"(read, not written: study {settings.study_name} holds {done} finished trials, {left} left to run)"
                if done else "(nothing created)")]
    basis = (f"{trainings} trainings of {epochs[0]} epochs{' and the refit' if settings.refit else ''}, without "
             f"pruning" + (f"; each trial's {folds} folds at once (stacked)" if stacked else "") + (f"; capped by {'--timeout' if min(limits) == settings.timeout else '--budget'}"
                          if capped else ""))
    trial = (stacked.run_seconds(epochs[0]) if stacked else calibration.run_seconds(epochs[0]) * folds)
    short = [f"{flag} of {duration_text(limit)} is shorter than one trial (about {duration_text(trial)}): the "
             f"search would likely finish no trial" for flag, limit in (("--timeout", settings.timeout),
                                                                       ("--budget", settings.budget))
             if limit is not None and limit < trial]
    return Forecast(lines, calibration, min([estimate, *limits]), basis, short)


def finished_before(settings: SearchSettings) -> int:
    """The finished trials (complete and pruned) an existing ``--storage`` study already holds toward
    ``--n-trials``, read without creating or writing anything; 0 when there is no such study (or a journal file,
    which is not read)."""
    import optuna

    from optiflow.search.workers import finished
    from optiflow.stores import sqlite_path

    url, name = settings.storage, settings.study_name
    if not url or not name or "://" not in url or url.startswith("journal:"):
        return 0
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        return 0
    try:
        storage = optuna.storages.RDBStorage(url, skip_compatibility_check=True, skip_table_creation=True)
        return finished(optuna.load_study(study_name=name, storage=storage))
    except KeyError:  # no such study in the storage
        return 0


def _middle(dim: Dimension) -> Scalar:
    """The value a dry run calibrates with: a choice's first, a range's middle (geometric for a log range)."""
    if dim.kind == "choice":
        return dim.choices[0]
    middle = math.sqrt(dim.low * dim.high) if dim.log else (dim.low + dim.high) / 2
    return int(round(middle)) if dim.kind == "int" else middle


def _mean_value(dim: Dimension) -> float:
    """The mean a uniform draw of ``dim`` gives (a choice's values, a range's middle)."""
    if dim.kind == "choice":
        return statistics.fmean(float(str(c)) for c in dim.choices)
    return float(str(_middle(dim)))
