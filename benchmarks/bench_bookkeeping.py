"""What a search pays per child run besides training, in one process: the store writes of a cross-validation
fold, of a trial's own run and of a tracked training (a search trial or a compare variant), and the
pre-training work repeated per fold (``prepare``).  Issue 24's goal: at most 10 ms each on a local SQLite store.

- fold runs: K=5 finished folds of realistic size (``--epochs`` epochs x the 10 per-epoch metrics a stacked
  fold logs, its 3 final metrics, 38 params, 12 tags) written by ``tracking.log_finished`` (one transaction on
  a SQL store), by the same function made to write one by one (as on a tracking server, and as before), and
  by a plain ``MlflowClient`` loop (create_run, log_batch, set_terminated) in the same process.
- trial run: a CV trial's own run as ``search.objective`` writes it (opened, params, per-fold scores and
  per-epoch means, ended).
- tracked training: a 1-epoch ``train()`` of a search child (no figures, no model); the time spent in store
  calls (``tracking.retry``) per run.
- prepare: ``run.prepare`` of a fold's configuration with the dataset already loaded (``shared_data``), the
  median over the trials x folds of a 10 x 5 search.

Prints the machine and its load (benchmarks/conditions.py) before and after the rounds, and per figure the
median over ``--rounds`` in milliseconds per run, wall and this process's CPU time (on a loaded machine the
CPU time says more than the wall time, though neither is a result), with the writes' ratio to the plain
client loop.

    python benchmarks/bench_bookkeeping.py             # 5 rounds
    python benchmarks/bench_bookkeeping.py --rounds 9 --epochs 50
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from conditions import Round, machine_line

FOLDS = 5
KEYS = ("train_loss", "train_accuracy", "train_objective", "val_loss", "val_accuracy", "epoch_time", "lr",
        "samples_per_sec", "grad_norm/fc1", "grad_norm/fc2")


def fold_content(epochs: int, fold: int) -> tuple[list[tuple[dict[str, float], int]], dict[str, Any], dict[str, str]]:
    """(per-step metric dicts, params, tags) of one fold run of ``epochs`` epochs."""
    metrics = [({key: 1.0 / (epoch + i + fold) for i, key in enumerate(KEYS)}, epoch) for epoch in range(1, epochs + 1)]
    metrics.append(({"test_accuracy": 0.97, "test_loss": 0.1, "train_seconds": 1.5}, epochs))
    params = {**{f"param_{i}": f"value {i}" for i in range(36)}, "cv_folds": FOLDS, "cv_fold": fold}
    tags = {**{f"tag_{i}": f"value {i}" for i in range(9)}, "optiflow.cv_fold": str(fold),
            "optiflow.stacked_folds": str(FOLDS), "optuna.trial_number": "3"}
    return metrics, params, tags


def write_folds(uri: str, experiment: str, parent_id: str, epochs: int) -> None:
    """K fold runs through ``tracking.log_finished``, as ``search.folds`` writes them."""
    from optiflow.tracking import Tracker, log_finished

    first = Tracker(uri, experiment)
    trackers, tags = [], []
    for fold in range(FOLDS):
        metrics, params, fold_tags = fold_content(epochs, fold)
        tracker = first.sibling() if fold else first
        for values, step in metrics:
            tracker.log_metrics(values, step=step, flush=False)
        tracker.log_params(params, flush=False)
        trackers.append(tracker)
        tags.append(fold_tags)
    now = int(time.time() * 1000)
    log_finished(trackers, [f"trial 3 fold {fold}" for fold in range(FOLDS)], tags, parent_id, now, now)


def write_folds_plainly(uri: str, experiment_id: str, parent_id: str, epochs: int) -> None:
    """K fold runs through a plain ``MlflowClient`` loop: the reference."""
    from mlflow.entities import Metric, Param

    from optiflow.tracking import client

    mlflow_client = client(uri)
    for fold in range(FOLDS):
        metrics, params, tags = fold_content(epochs, fold)
        now = int(time.time() * 1000)
        run = mlflow_client.create_run(experiment_id, run_name=f"trial 3 fold {fold}",
                                       tags={**tags, "mlflow.parentRunId": parent_id})
        mlflow_client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                                metrics=[Metric(k, v, now, step) for values, step in metrics for k, v in values.items()])
        mlflow_client.set_terminated(run.info.run_id)


def write_trial(uri: str, experiment: str, parent_id: str, epochs: int) -> None:
    """A CV trial's own run, as ``search.objective._cross_validate`` writes it around its folds."""
    from optiflow.tracking import Tracker, run_status

    tracker = Tracker(uri, experiment)
    tracker.log_params({**fold_content(epochs, 0)[1], "cv_folds": FOLDS}, flush=False)
    tracker.start(run_name="trial 3", tags={"optiflow.kind": "cross-validation"}, parent_run_id=parent_id)
    with run_status(tracker):
        for fold in range(FOLDS):
            tracker.log_metrics({"cv_val_accuracy": 0.9 + fold / 100}, step=fold + 1, flush=False)
        for values, step in fold_content(epochs, 0)[0][:-1]:
            tracker.log_metrics(values, step=step, flush=False)
        tracker.log_metrics({"cv_val_accuracy_mean": 0.92, "cv_val_accuracy_std": 0.01}, flush=False)


@contextlib.contextmanager
def one_by_one() -> Iterator[None]:
    """Within the block the bulk writes do not apply (as on a tracking server): the client writes."""
    from optiflow import bulkwrite

    saved = bulkwrite.sql_store
    bulkwrite.sql_store = lambda mlflow_client: None
    try:
        yield
    finally:
        bulkwrite.sql_store = saved


def store_seconds() -> tuple[Callable[[], tuple[float, float]], Callable[[], None]]:
    """((wall, CPU) seconds spent in store calls so far, undo): times every ``tracking.retry`` call."""
    from optiflow import tracking

    spent = [0.0, 0.0]
    retry = tracking.retry

    def timed(fn: Callable[..., Any], *args: object, **kwargs: object) -> Any:
        started, cpu = time.perf_counter(), time.process_time()
        try:
            return retry(fn, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started
            spent[1] += time.process_time() - cpu

    tracking.retry = timed
    return (lambda: (spent[0], spent[1])), (lambda: setattr(tracking, "retry", retry))


def tracked_training(uri: str, experiment: str, parent_id: str) -> tuple[float, float]:
    """(wall, CPU) seconds of store calls of one 1-epoch search child run trained by ``train()``."""
    from optiflow.config import RunConfig
    from optiflow.training import train

    config = RunConfig.from_dict({"epochs": 1, "tracking_uri": uri, "experiment": experiment,
                                  "model": "mlp:hidden=[32]", "batch_size": 128})
    spent, undo = store_seconds()
    try:
        train(config, parent_run_id=parent_id, log_model=False, artifacts=False)
    finally:
        undo()
    return spent()


def prepare_seconds(trials: int = 10) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each ``prepare`` of a 10-trial x 5-fold search's folds, the dataset shared."""
    from optiflow.config import RunConfig
    from optiflow.plugins import get_registry
    from optiflow.run import prepare

    registry, times = get_registry(), []
    for trial in range(trials):
        base = RunConfig.from_dict({"epochs": 10 + trial, "model": f"mlp:hidden=[{32 + 20 * trial}]",
                                    "lr": (0.001, 0.01, 0.1)[trial % 3], "batch_size": 32 + 9 * trial})
        for fold in range(FOLDS):
            started, cpu = time.perf_counter(), time.process_time()
            prepare(base.replace(cv_folds=FOLDS, cv_fold=fold), registry)
            times.append((time.perf_counter() - started, time.process_time() - cpu))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="repetitions; medians are printed [5]")
    parser.add_argument("--epochs", type=int, default=30, help="epochs per fold run (10 metrics each) [30]")
    args = parser.parse_args()
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    print(machine_line())
    from optiflow.run import shared_data
    from optiflow.tracking import Tracker

    uri = f"sqlite:///{tempfile.mkdtemp(prefix='optiflow-bench-bookkeeping-')}/mlflow.db"
    parent = Tracker(uri, "bench-bookkeeping")
    parent_id = parent.start(run_name="parent")
    with shared_data():
        prepare_seconds(1)  # imports, the dataset loaded once, its folds cut once
        tracked_training(uri, "bench-bookkeeping", parent_id)
        ms: dict[str, list[tuple[float, float]]] = {}
        with Round(f"{args.rounds} rounds") as conditions:
            for _ in range(args.rounds):
                for label, write in (
                    ("fold run, one transaction", lambda: write_folds(uri, parent.experiment, parent_id, args.epochs)),
                    ("fold run, one by one", lambda: _apart(write_folds, uri, parent.experiment, parent_id, args.epochs)),
                    ("fold run, plain MlflowClient", lambda: write_folds_plainly(uri, parent.experiment_id, parent_id,
                                                                                 args.epochs)),
                ):
                    ms.setdefault(label, []).append(_timed(write, FOLDS))
                for label, apart in (("trial run", False), ("trial run, one by one", True)):
                    ms.setdefault(label, []).append(_timed(lambda apart=apart: (_apart if apart else _call)(
                        write_trial, uri, parent.experiment, parent_id, args.epochs), 1))
                wall, cpu = tracked_training(uri, parent.experiment, parent_id)
                ms.setdefault("tracked training (store calls)", []).append((wall * 1e3, cpu * 1e3))
                prepared = prepare_seconds()
                ms.setdefault("prepare (per fold)", []).append(
                    tuple(statistics.median(t[i] for t in prepared) * 1e3 for i in (0, 1)))  # type: ignore[arg-type]
    plain = statistics.median(wall for wall, _ in ms["fold run, plain MlflowClient"])
    print("milliseconds per run, median over the rounds: wall (min), CPU of this process")
    for label, values in ms.items():
        walls = [wall for wall, _ in values]
        ratio = f"  {statistics.median(walls) / plain:.2f}x the plain client loop" if label.startswith("fold") else ""
        print(f"{label:32s} wall {statistics.median(walls):7.1f} (min {min(walls):6.1f})  "
              f"CPU {statistics.median(cpu for _, cpu in values):6.1f}{ratio}")
    print(f"conditions: {conditions.describe()}")


def _timed(write: Callable[[], None], runs: int) -> tuple[float, float]:
    """(wall, CPU) milliseconds per run of ``write()``, which writes ``runs`` runs."""
    started, cpu = time.perf_counter(), time.process_time()
    write()
    return (time.perf_counter() - started) * 1e3 / runs, (time.process_time() - cpu) * 1e3 / runs


def _call(fn: Callable[..., None], *args: object) -> None:
    fn(*args)


def _apart(fn: Callable[..., None], *args: object) -> None:
    with one_by_one():
        fn(*args)


if __name__ == "__main__":
    main()
