"""``optiflow compare``: one training per variant of a grid (and per seed) under one parent MLflow run."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optiflow.config import RunConfig, split_variants
from optiflow.errors import OptiflowError, TrainingError
from optiflow.forecast import Tick, eta
from optiflow.metrics import csv_text, default_metric, final_metrics, higher_is_better, markdown_table, number
from optiflow.values import key_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from optiflow.run import Reporter
    from optiflow.tracking import Tracker

NOT_VARIABLE = frozenset({"experiment", "tracking_uri", "run_name"})
VARIABLE_KEYS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in NOT_VARIABLE)


@dataclass
class ChildRun:
    """One training of one variant with one seed."""

    label: str
    seed: int
    status: str
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    failure: str | None = None
    #: a FINISHED run of the same content key, reused instead of training (``run_id`` is that run)
    reused: bool = False


SECONDS_COLUMN = "seconds (all seeds)"  #: a variant's training time, its runs' summed
BRIEF_COLUMNS = ("variant", "runs", "mean [95% CI]", "vs baseline (paired)", SECONDS_COLUMN, "best")


@dataclass
class Comparison:
    """What ``compare`` produced: the parent run, every child, the summary and where files went."""

    parent_run_id: str
    metric: str
    children: list[ChildRun]
    columns: list[str]
    rows: list[list[str]]
    brief: list[list[str]]
    out_dir: Path
    files: list[Path]
    best: str | None
    registered: tuple[str, str, str] | None = None
    failure: str | None = None
    #: how to read the intervals and tests, or why there are none
    note: str = ""

    @property
    def reused(self) -> int:
        """How many of the children reused a finished run instead of training."""
        return sum(child.reused for child in self.children)

    def best_child(self) -> ChildRun | None:
        """The best variant's child with the best metric (its best seed with ``--repeats``)."""
        runs = [c for c in self.children if c.label == self.best and self.metric in c.metrics and c.run_id]
        better = max if higher_is_better(self.metric) else min
        return better(runs, key=lambda c: c.metrics[self.metric]) if runs else None


def parse_vary(items: object) -> dict[str, list[str]]:
    """``["opt=sgd,adam", "lr=0.1,0.01"]`` as ``{"opt": [...], "lr": [...]}``; a later key wins.  Items may
    also be YAML mappings ``{opt: [sgd, adam]}`` (from a ``--config`` file)."""
    pairs: list[tuple[str, Any]] = []
    for item in items if isinstance(items, (list, tuple)) else [items]:
        if isinstance(item, dict):
            pairs += list(item.items())
            continue
        key, sep, values = str(item).partition("=")
        if not sep or not key.strip() or not values.strip():
            raise OptiflowError(f"--vary expects KEY=VALUE,VALUE,... (e.g. opt=sgd,adam), got '{item}'")
        pairs.append((key, values))
    vary: dict[str, list[str]] = {}
    for raw_key, values in pairs:
        key = key_name(str(raw_key).strip())
        if key not in VARIABLE_KEYS:
            close = [k for k in VARIABLE_KEYS if key.startswith(k)] or difflib.get_close_matches(key, VARIABLE_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise OptiflowError(f"cannot vary '{raw_key}'{hint}; choose from {', '.join(VARIABLE_KEYS)}")
        listed = values if isinstance(values, list) else split_variants(str(values))
        if not listed:
            raise OptiflowError(f"--vary {key}: no values to compare; list at least one (e.g. {key}: [a, b])")
        vary[key] = [str(v) for v in listed]
    if not vary:
        raise OptiflowError("nothing to compare: give at least one --vary KEY=VALUE,VALUE,...")
    return vary


def variants(vary: dict[str, list[str]]) -> list[dict[str, str]]:
    """The grid product of the varied values, in the order given."""
    keys = list(vary)
    return [dict(zip(keys, values)) for values in itertools.product(*(vary[k] for k in keys))]


def variant_label(values: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


def baseline_variant(name: str | None, labels: list[str]) -> str:
    """The variant ``--baseline`` names: its label (``opt=sgd``) or, with one varied key, its value (``sgd``);
    the first variant when None."""
    if name is None:
        return labels[0]
    by_value = {label.partition("=")[2]: label for label in labels} if all(" " not in label for label in labels) else {}
    found = name if name in labels else by_value.get(name)
    if found is None:
        close = difflib.get_close_matches(name, labels + list(by_value), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise OptiflowError(f"--baseline '{name}' is not a variant{hint}; choose from {', '.join(labels)}")
    return found


def plan_runs(base: RunConfig, vary: dict[str, list[str]], repeats: int) -> list[tuple[str, RunConfig]]:
    """Every (label, config) to train, validated against the registry before anything runs."""
    from optiflow.plan import plan
    from optiflow.plugins import get_registry

    if not 1 <= repeats <= 10_000:
        raise OptiflowError(f"--repeats must be in [1, 10000], got {repeats}")
    registry = get_registry()
    runs = []
    for values in variants(vary):
        label = variant_label(values)
        for repeat in range(repeats):
            seed = int(values.get("seed", base.seed)) + repeat
            name = f"{label} seed={seed}" if repeats > 1 else label
            try:
                config = base.replace(**{**values, "seed": seed, "run_name": name})
            except OptiflowError as exc:
                raise OptiflowError(f"variant {label}: {exc}") from None
            plan(config, registry)
            runs.append((label, config))
    return runs


def compare(base: RunConfig, vary: dict[str, list[str]], *, repeats: int = 1, metric: str | None = None,
            baseline: str | None = None, out_dir: str | Path | None = None, log_models: bool = False,
            register: str | None = None, tags: dict[str, str] | None = None,
            announce: Callable[[int, int, str, RunConfig], Any] | None = None,
            reporter_factory: Callable[[], Any] | None = None, progress: Callable[[Tick], Any] | None = None,
            reuse: bool = True) -> Comparison:
    """Train every variant (``repeats`` seeds each) as child runs of one parent run, then summarize.

    A variant whose training diverges is recorded as FAILED and the comparison goes on;
    Ctrl-C ends the parent KILLED, any other error ends it FAILED.  Each variant's ``metric`` is summarized by
    its mean and 95% t-interval over seeds and a paired t-test against ``baseline`` (default: the first).  ``register`` logs every child's
    model and registers the best variant's (:meth:`Comparison.best_child`) under that name.  ``reuse``: a run whose
    content key a FINISHED run of the experiment holds is that run, not trained again (:mod:`optiflow.reuse`).
    ``progress`` gets a :class:`~optiflow.forecast.Tick` after each run: runs done, the best so far, the ETA.
    """
    from optiflow import heartbeat, host, stores
    from optiflow.reuse import reused_tags
    from optiflow.tracking import Tracker, run_status

    runs = plan_runs(base, vary, repeats)
    heartbeat.check_settings()
    baseline = baseline_variant(baseline, [variant_label(values) for values in variants(vary)])
    if out_dir:
        _output_folder(Path(out_dir))  # before any run opens
    host.imports_done(ahead=stores.run_imports(base.tracking_uri))  # once the input is checked, before any run
    preflight_variants(runs, metric)
    tracker = Tracker(base.tracking_uri, base.experiment)
    parent_name = base.run_name or "compare " + " x ".join(vary)
    tracker.start(run_name=parent_name, tags={**(tags or {}), "optiflow.kind": "compare"})
    with run_status(tracker) as outcome, heartbeat.beating(tracker):
        tracker.log_params({**{f"vary.{k}": " | ".join(v) for k, v in vary.items()}, "repeats": repeats,
                            "variants": len(runs) // repeats, "runs": len(runs)})
        tracker.log_text(base.to_yaml(), "config.yaml")
        children: list[ChildRun] = []
        durations: list[float] = []
        for index, (label, config) in enumerate(runs, 1):
            if announce is not None:
                announce(index, len(runs), config.run_name or label, config)
            reporter = reporter_factory() if reporter_factory else None
            started = time.perf_counter()
            children.append(_train_child(label, config, str(tracker.run_id), {**(tags or {}), "optiflow.variant": label},
                                         log_models or bool(register), reporter, reuse))
            seconds = time.perf_counter() - started
            if not children[-1].reused:  # a reused run cost nothing and says nothing of the runs left
                durations.append(seconds)
            if progress is not None:
                progress(run_tick(children, seconds, durations, len(runs), metric))
        reused = {c.label + (f" seed={c.seed}" if repeats > 1 else ""): str(c.run_id) for c in children if c.reused}
        if reused:
            tracker.set_tags(reused_tags(reused, len(runs)))
        comparison = _summarize(tracker, children, metric, out_dir, baseline)
        if not any(c.status == "FINISHED" for c in children):
            outcome.status = "FAILED"
            comparison.failure = "every variant failed; see the 'failure' tag of each child run"
    if register:
        _register_best(comparison, register, tracker)
    return comparison


def run_tick(children: list[ChildRun], seconds: float, durations: list[float], total: int, metric: str | None) -> Tick:
    """Where the comparison stands after its last run (which took ``seconds``): runs done of ``total``, the best run
    so far by ``metric`` (the default metric when None) and the ETA from the trained runs' ``durations``."""
    child = children[-1]
    finished = [c for c in children if c.status == "FINISHED"]
    metric = metric or (default_metric(list(finished[0].metrics)) if finished else None)
    scored = [c for c in finished if metric in c.metrics]
    value = f"{metric}={child.metrics[str(metric)]:.4g}" if child in scored else (child.failure or child.status.lower())
    best = None
    if scored:
        top = (max if higher_is_better(str(metric)) else min)(scored, key=lambda c: c.metrics[str(metric)])
        best = f"{metric}={top.metrics[str(metric)]:.4g} ({top.label} seed={top.seed})"
    what = f"{child.label} seed={child.seed} {child.status.lower()}: {value}" + (" (reused)" if child.reused else "")
    return Tick(len(children), total, what, seconds, eta(durations, total - len(children)), best)


def _train_child(label: str, config: RunConfig, parent_run_id: str, tags: dict[str, str], log_model: bool,
                 reporter: Reporter | None, reuse: bool) -> ChildRun:
    """One seed of variant ``label`` trained (or reused) as a child run of ``parent_run_id``; FAILED when it
    diverges (the comparison goes on)."""
    from optiflow.training import train

    try:
        result = train(config, parent_run_id=parent_run_id, extra_tags=tags, log_model=log_model, reporter=reporter,
                       role="compare-child", reuse=reuse)
    except TrainingError as exc:
        return ChildRun(label, config.seed, "FAILED", failure=str(exc))
    final = final_metrics(result.metrics, result.history, result.seconds)
    return ChildRun(label, config.seed, "FINISHED", result.run_id, final, result.history, result.seconds,
                    reused=result.reused)


def preflight_variants(runs: list[tuple[str, RunConfig]], metric: str | None) -> None:
    """Each variant (its first seed) passes all that a training checks before its run opens, and logs the
    ``metric`` to rank by (:func:`~optiflow.training.check_ranking_metric`), before the comparison's parent run
    opens: bad input is one line naming the variant, and no run is left FAILED."""
    from optiflow.training import check_ranking_metric, preflight

    checked: set[str] = set()
    for label, config in runs:
        if label in checked:
            continue
        checked.add(label)
        try:
            run = preflight(config)
            if metric is not None:
                check_ranking_metric(metric, run)
        except OptiflowError as exc:
            raise OptiflowError(f"variant {label}: {exc}") from None


def _register_best(comparison: Comparison, name: str, tracker: Tracker) -> None:
    """Register the best variant's model as ``name`` and tag the parent run with it; a failure is the
    comparison's ``failure``, the comparison itself stays logged."""
    from optiflow.export import register_model

    best = comparison.best_child()
    if best is None or best.run_id is None:
        return
    try:
        comparison.registered = (name, register_model(best.run_id, name, tracker.uri), best.run_id)
        tracker.set_tags({"registered_model": f"models:/{name}/{comparison.registered[1]}",
                          "registered_run_id": best.run_id})
    except OptiflowError as exc:
        comparison.failure = f"the comparison is logged, but its best model was not registered: {exc}"


def _summarize(tracker: Tracker, children: list[ChildRun], metric: str | None, out_dir: str | Path | None,
               baseline: str | None = None) -> Comparison:
    from optiflow.confidence import NO_INTERVAL, paired_test, t_interval
    from optiflow.plots import metric_intervals

    finished = [c for c in children if c.status == "FINISHED"]
    metric = metric or default_metric(list(finished[0].metrics) if finished else [])
    if finished and not any(metric in c.metrics for c in finished):
        available = sorted({k for c in finished for k in c.metrics})
        raise OptiflowError(f"no run produced metric '{metric}'; available: {', '.join(available)}")
    labels = list(dict.fromkeys(c.label for c in children))
    baseline = baseline or labels[0]
    by_label = {label: [c for c in children if c.label == label] for label in labels}
    by_seed = {label: {c.seed: c.metrics[metric] for c in runs if metric in c.metrics} for label, runs in by_label.items()}
    scores = {label: list(seeds.values()) for label, seeds in by_seed.items()}
    intervals = {label: t_interval(scores[label]) for label in labels}
    tests = {label: paired_test(by_seed[label], by_seed[baseline]) if label != baseline else None for label in labels}
    ranked = [label for label in labels if scores[label]]
    better = max if higher_is_better(metric) else min
    best = better(ranked, key=lambda label: statistics.fmean(scores[label])) if ranked else None

    extra = [k for k in ("test_loss", "train_loss", "val_loss") if k != metric]
    columns = ["variant", "runs", "failed", f"{metric} mean", f"{metric} std", f"{metric} 95% CI low",
               f"{metric} 95% CI high", f"{metric} min", f"{metric} max", f"difference to {baseline}",
               "p (paired t-test)", "significant at 5%", *(f"{k} mean" for k in extra), SECONDS_COLUMN, "best"]
    rows, brief = [], []
    for label, runs in by_label.items():
        values, interval, test = scores[label], intervals[label], tests[label]
        means = [_mean([c.metrics[k] for c in runs if k in c.metrics]) for k in extra]
        versus = ["baseline", "-", "-"] if label == baseline else ["-", "-", "-"] if test is None else [
            f"{test.difference:+.4g}", f"{test.p_value:.3g}", "yes" if test.significant else "no"]
        rows.append([
            label, str(len(runs)), str(sum(c.status != "FINISHED" for c in runs)),
            number(_mean(values)), number(statistics.stdev(values) if len(values) > 1 else None),
            number(interval.low if interval else None), number(interval.high if interval else None),
            number(min(values) if values else None), number(max(values) if values else None), *versus,
            *(number(m) for m in means), f"{sum(c.seconds for c in runs):.1f}", "yes" if label == best else "",
        ])
        failed = rows[-1][2]
        mean = number(_mean(values)) + (f" [{number(interval.low)}, {number(interval.high)}]" if interval else "")
        against = "baseline" if label == baseline else "-" if test is None else (
            f"{test.difference:+.4g} (p={test.p_value:.2g}){' *' if test.significant else ''}")
        brief.append([label, str(len(runs)) + (f" ({failed} failed)" if failed != "0" else ""), mean, against,
                      rows[-1][-2], rows[-1][-1]])
    several = any(interval is not None for interval in intervals.values())
    note = ("mean [95% t-interval over seeds]; difference to the baseline by a two-sided paired t-test over the "
            "same seeds, * significant at 5%" if several else NO_INTERVAL)
    out = _output_folder(Path(out_dir) if out_dir else Path("compare") / tracker.open_run_id)
    chart = metric_intervals(ranked, [scores[label] for label in ranked],
                             [intervals[label] for label in ranked], metric)
    files = _write_outputs(tracker, out, children, metric, chart, (columns, rows), note)
    tracker.log_metrics(interval_metrics(labels, metric, intervals, tests))
    tracker.set_tags({f"variant_{index}": label for index, label in enumerate(labels, 1)}
                     | {"baseline_variant": baseline, "metric": metric})
    if best is not None:
        tracker.log_metrics({f"best_{metric}": _mean(scores[best])})
        tracker.set_tags({"best_variant": best})
    return Comparison(tracker.open_run_id, metric, children, columns, rows, brief, out, files, best, note=note)


def _write_outputs(tracker: Tracker, out: Path, children: list[ChildRun], metric: str, chart: Figure,
                   summary: tuple[list[str], list[list[str]]], note: str) -> list[Path]:
    """The loss curves, ``chart``, the ``summary`` table (CSV and Markdown, with ``note``) and the runs table
    in ``out``, each logged to the parent run; returns their paths."""
    import matplotlib.pyplot as plt

    from optiflow.plots import overlay_curves

    files = [out / name for name in ("loss_curves.png", "final_metric.png", "summary.csv", "summary.md", "runs.csv")]
    histories: dict[str, list[dict[str, list[float]]]] = {}
    for child in children:
        histories.setdefault(child.label, []).extend([child.history] if child.history else [])
    curves = overlay_curves(histories, title="loss per variant")
    for figure, path in ((curves, files[0]), (chart, files[1])):
        figure.savefig(path, dpi=110)
        figure.clf()
    plt.close("all")
    files[2].write_text(csv_text(*summary))
    files[3].write_text(markdown_table(*summary) + f"\n{note}.\n")
    run_columns = ["variant", "seed", "status", "run_id", metric, "seconds", "failure", "reused"]
    files[4].write_text(csv_text(run_columns, [[c.label, c.seed, c.status, c.run_id or "-", number(c.metrics.get(metric)),
                                                f"{c.seconds:.1f}", c.failure or "", "yes" if c.reused else ""]
                                               for c in children]))
    for path in files:
        tracker.log_artifact(path)
    return files


def interval_metrics(labels: list[str], metric: str, intervals: dict[str, Any], tests: dict[str, Any]) -> dict[str, float]:
    """The parent run's metrics: per variant (``variant_<i>``, its label in the tag of that name) the mean and
    95% interval of ``metric`` and, against the baseline, the mean paired difference and its p-value."""
    out: dict[str, float] = {}
    for index, label in enumerate(labels, 1):
        interval, test = intervals[label], tests[label]
        if interval is not None:
            out.update({f"variant_{index}.{metric}_mean": interval.mean, f"variant_{index}.{metric}_ci_low": interval.low,
                        f"variant_{index}.{metric}_ci_high": interval.high})
        if test is not None:
            out.update({f"variant_{index}.{metric}_difference": test.difference,
                        f"variant_{index}.{metric}_p_value": test.p_value})
    return out


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(finite) if finite else None


def _output_folder(out: Path) -> Path:
    """``out``, created if missing (git-ignored: :func:`~optiflow.stores.created_folder`); one clear line when
    it cannot be."""
    from optiflow.stores import created_folder

    try:
        created_folder(out)
    except OSError as exc:
        raise OptiflowError(f"cannot create the output folder {out}: {exc.strerror}") from None
    return out
