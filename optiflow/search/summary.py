"""What a study found, logged on its parent run: trial counts, the trials table, the best parameters, Optuna's plots."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
import yaml

from optiflow.drawing import Recipe
from optiflow.metrics import csv_text, markdown_table, number
from optiflow.reuse import reused_tags
from optiflow.search.space import short
from optiflow.search.study import SearchSettings
from optiflow.search.workers import OVER_ATTR, REUSED_ATTR, RUN_ATTR

if TYPE_CHECKING:
    from optiflow.runlog import RunTracker
    from optiflow.search.stopping import Stop
    from optiflow.tracking import Tracker


@dataclass
class SearchResult:
    """The study's summary: the best trial, the trials table (best first) and the count per state."""

    study_name: str
    parent_run_id: str
    best_value: float | None
    best_params: dict[str, Any]
    columns: list[str]
    rows: list[list[str]]
    counts: dict[str, int]
    refit: Refit | None = None
    #: why the study stopped (None: another worker still runs trials and ends it)
    stop: Stop | None = None
    #: trials that reused a finished run's score instead of training (:mod:`optiflow.reuse`)
    reused: int = 0
    #: no trial completed and some failed: why (the first failed trial's error), else None
    none_completed: str | None = None

    @property
    def failure(self) -> str | None:
        """Why the command exits non-zero: no trial completed, or the study is complete but its refit failed."""
        if self.none_completed:
            return self.none_completed
        if self.refit is not None and self.refit.failure:
            return f"the study is logged, but its refit failed: {self.refit.failure}"
        return None


@dataclass
class Refit:
    """The best configuration trained again on the whole training split: its run, test metrics and registration
    (``failure`` says why there is none)."""

    trial: int
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    val_split: float = 0.0
    registered: tuple[str, str] | None = None
    failure: str | None = None


def summarize(tracker: Tracker, study: optuna.Study, settings: SearchSettings, plots: bool = True) -> SearchResult:
    """Best value and parameters, trial counts, the trials table and (``plots``) Optuna's plots on the parent run."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(OVER_ATTR)]
    counts = {state.name: sum(t.state == state for t in trials) for state in optuna.trial.TrialState}
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = study.best_trial if complete else None
    names = list(dict.fromkeys(k for t in trials for k in t.params))
    columns = ["trial", "state", settings.metric, *names, "mlflow run", "reused"]
    ordered = sorted(trials, key=lambda t: (t.value is None, (t.value or 0) * (1 if settings.direction == "minimize" else -1)))
    rows = [[str(t.number), t.state.name, number(t.value), *(short(t.params.get(n, "-")) for n in names),
             str(t.user_attrs.get(RUN_ATTR, "-")), "yes" if t.user_attrs.get(REUSED_ATTR) else ""] for t in ordered]
    reused = {f"trial {t.number}": str(t.user_attrs[REUSED_ATTR]) for t in trials if t.user_attrs.get(REUSED_ATTR)}
    if reused:
        tracker.set_tags(reused_tags(reused, len(trials), "trials"))
    tracker.log_metrics({"n_trials": len(trials), **{f"n_{k.lower()}": v for k, v in counts.items() if v}},
                        step=len(trials))
    tracker.log_text(csv_text(columns, rows), "trials.csv")
    tracker.log_text(markdown_table(columns, rows), "trials.md")
    if best is not None:
        tracker.log_metrics({"best_value": best.value}, step=len(trials))
        tracker.set_tags({"best_trial": best.number, "best_run_id": best.user_attrs.get("mlflow_run_id", "-"),
                          **{f"best.{k}": v for k, v in best.params.items()}})
        tracker.log_text(yaml.safe_dump({"value": best.value, "metric": settings.metric, "trial": best.number,
                                         "params": best.params}, sort_keys=False), "best_params.yaml")
        if plots:
            _log_plots(tracker, study, settings, complete=len(complete) if names else 0)
    return SearchResult(study.study_name, tracker.open_run_id, best.value if best else None,
                        dict(best.params) if best else {}, columns, rows, counts, reused=len(reused),
                        none_completed=_none_completed(trials))


def _none_completed(trials: list[optuna.trial.FrozenTrial]) -> str | None:
    """``no trial completed (trial 0 failed: ...)`` when some trials failed and none completed, else None."""
    states = {t.state for t in trials}
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    if not failed or optuna.trial.TrialState.COMPLETE in states or optuna.trial.TrialState.RUNNING in states:
        return None
    first = min(failed, key=lambda t: t.number)
    return f"no trial completed: {len(failed)} failed, the first (trial {first.number}) with: " \
           f"{str(first.user_attrs.get('failure', '')).partition(chr(10))[0] or 'no error recorded'}"


def _log_plots(tracker: RunTracker, study: optuna.Study, settings: SearchSettings, complete: int) -> None:
    """Optuna's optimization history, parameter importances (two or more ``complete`` trials, the count in the
    title) and intermediate values (pruning), each naming the metric instead of Optuna's "Objective Value": drawn
    beside the search (:mod:`optiflow.drawing`) from a copy of its trials, while the refit trains."""
    from optuna.distributions import distribution_to_json

    plots = ["optimization_history.png"] + ["param_importances.png"] * (complete > 1) + \
        ["intermediate_values.png"] * (settings.pruner != "none")
    trials = [{"state": t.state.name, "value": t.value, "params": t.params, "intermediate": t.intermediate_values,
               "distributions": {k: distribution_to_json(d) for k, d in t.distributions.items()}}
              for t in study.get_trials(deepcopy=False)]
    for artifact in plots:
        tracker.log_figure(Recipe("optiflow.plots:study_plot", {
            "artifact": artifact, "trials": trials, "metric": settings.metric, "complete": complete,
            "direction": study.direction.name.lower()}), artifact)


def log_plots_drawn(tracker: Tracker) -> None:
    """Log the study's plots once drawn; one Optuna cannot draw (too few distinct trials) is a
    ``plot.<file>`` tag saying why."""
    for artifact, exc in tracker.collect_figures(raise_errors=False).items():
        if not isinstance(exc, (ValueError, RuntimeError, ZeroDivisionError)):
            raise exc
        tracker.set_tags({f"plot.{artifact}": f"not drawn: {exc}"[:500]})
