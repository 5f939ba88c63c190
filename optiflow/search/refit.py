"""The refit: the study's best configuration trained again on the whole training split, scored on the
untouched test split and logged with its model as a child of the study's parent run (``optiflow.role=refit``).

"The whole training split" is train + validation (every fold with ``--cv``): the refit has no CV fold and
``val_split`` 0, with the trials' seed, so its test split is theirs.  A configuration whose components monitor
a ``val_*`` metric (early stopping, the plateau scheduler: any component option ``monitor``) cannot train
without a validation set, so its refit keeps the base run's validation split (0.1 when that is 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import optuna

from optiflow.config import RunConfig
from optiflow.errors import first_line
from optiflow.search.claims import claim, release, settle
from optiflow.search.space import trial_config
from optiflow.search.study import SearchSettings
from optiflow.search.summary import Refit
from optiflow.search.workers import close_runs

if TYPE_CHECKING:
    from optiflow.tracking import Tracker

ROLE_TAG = "optiflow.role"
FALLBACK_VAL_SPLIT = 0.1


def refit(base: RunConfig, settings: SearchSettings, study: optuna.Study, parent: Tracker, *,
          tags: dict[str, str] | None = None, progress: Callable[[str], Any] | None = None) -> Refit | None:
    """Train the best trial's configuration again as a child of ``parent`` (the parent run's tracker) and
    register its model when ``settings.register`` names one.

    Returns None when no trial completed or another process sharing the study refits this best trial.
    A failure (of the training or of the registration) is returned in ``Refit.failure`` and tagged on the
    parent run, never raised, so that the study's summary survives it.
    """
    from optiflow.export import register_model
    from optiflow.training import train

    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return None
    best = study.best_trial
    if not _claim(study, best.number, shared=settings.storage is not None):
        return None
    if settings.storage is not None:
        _close_dead_refits(base.tracking_uri, parent.run_id, best.number)
    config = refit_config(base, settings, best)
    outcome = Refit(best.number, val_split=config.val_split)
    if progress is not None:
        kept = f", keeping --val-split {config.val_split:g} for its val_* monitor" if config.val_split else ""
        progress(f"refit: trial {best.number}'s configuration on the whole training split{kept}")
    run_tags = {**(tags or {}), ROLE_TAG: "refit", "optuna.study_name": study.study_name,
                "optiflow.refit_of_trial": str(best.number)}
    params = {"refit.trial_number": best.number, **{f"trial.{k}": v for k, v in best.params.items()}}
    try:
        result = train(config, parent_run_id=parent.run_id, extra_tags=run_tags, extra_params=params, log_model=True,
                       role="refit", reuse=settings.reuse)
        outcome.run_id, outcome.metrics = result.run_id, result.metrics
        if settings.register and result.run_id is not None:
            outcome.registered = (settings.register,
                                  register_model(result.run_id, settings.register, base.tracking_uri))
    except Exception as exc:  # any failure: the summary is already logged and must still be shown
        outcome.failure = first_line(exc) or type(exc).__name__
        if outcome.run_id is None and settings.storage is not None:
            release(study, _claim_name(best.number))
    if outcome.run_id is not None and settings.storage is not None:
        settle(study, _claim_name(best.number), f"refit run {outcome.run_id}")
    parent_tags = {"refit_run_id": outcome.run_id or "-"}
    if outcome.failure:
        parent_tags["refit_failure"] = outcome.failure[:5000]
    if outcome.registered:
        parent_tags["registered_model"] = f"models:/{outcome.registered[0]}/{outcome.registered[1]}"
    parent.set_tags(parent_tags)
    return outcome


def refit_config(base: RunConfig, settings: SearchSettings, best: optuna.trial.FrozenTrial) -> RunConfig:
    """The best trial's configuration without a CV fold, and without a validation split unless it monitors one."""
    config, _ = trial_config(base, settings.space, lambda dim: best.params[dim.name])
    val_split = (config.val_split or FALLBACK_VAL_SPLIT) if monitors_validation(config) else 0.0
    return config.replace(val_split=val_split, cv_folds=0, cv_fold=0, run_name=f"refit trial {best.number}")


def monitors_validation(config: RunConfig) -> bool:
    """Whether a component of the run watches a validation metric (an option ``monitor`` set to ``val_*``)."""
    from optiflow.plan import plan
    from optiflow.plugins import get_registry

    params = plan(config, get_registry()).params()
    return any(key.rpartition(".")[2] == "monitor" and str(value).startswith("val_") for key, value in params.items())


def _claim(study: optuna.Study, trial: int, shared: bool) -> bool:
    """Whether this process refits ``trial``: with a shared storage, the one that takes the study's claim
    ``refit-of-trial-N`` (:func:`~optiflow.search.claims.claim`: exactly one process does)."""
    return not shared or claim(study, _claim_name(trial))


def _close_dead_refits(tracking_uri: str | None, parent_id: str | None, trial: int) -> None:
    """End KILLED the refit runs of ``trial`` left RUNNING by a process killed mid-refit (this process holds the
    claim, so no other one refits that trial now)."""
    from optiflow.tracking import client, resolve_tracking_uri, retry

    store = client(resolve_tracking_uri(tracking_uri))
    parent = retry(store.get_run, parent_id)
    left = retry(store.search_runs, [parent.info.experiment_id],
                 f"tags.mlflow.parentRunId = '{parent_id}' and tags.`optiflow.refit_of_trial` = '{trial}' "
                 "and attributes.status = 'RUNNING'")
    for run in left:
        close_runs(tracking_uri, run.info.run_id, f"the process refitting trial {trial} stopped before the end; "
                                                  "a later search refit the trial again")


def _claim_name(trial: int) -> str:
    return f"refit-of-trial-{trial}"
