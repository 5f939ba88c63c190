"""A random search with 5-fold cross-validation over a small MLP on digits: optiflow against
scikit-learn's ``RandomizedSearchCV(MLPClassifier)``, the recipe the classic tutorials use.

Same budget on both sides: 10 trials x 5 folds over hidden size 32-256, learning rate in
{0.001, 0.01, 0.1}, 10-50 epochs, batch 32-128, Adam, standardized inputs; the best
configuration refit on the whole training split and scored on the same untouched test split
(optiflow's seeded 20% split).  Each side runs as a fresh process (``python -c`` for
scikit-learn, the ``optiflow search`` command), so both pay their start-up and imports; the
two are interleaved round by round (every other round reversed).  The MLflow store's tables are
created before the first round (once per project, not per search).  Prints each round's wall
times, the median time ratio optiflow/scikit-learn and both test accuracies.  Each round prints the
machine's load average before and after it and whether it counts (benchmarks/conditions.py: at most
0.5 per core; before a round the benchmark waits up to ``--settle`` seconds for the previous one's
load to fade); the summary uses comparable rounds only, and says so when there are none.

Each round also times, as a fresh process, what the optiflow side cannot avoid importing (torch,
``torch._dynamo`` that every ``torch.optim`` step and ``torch.export`` import, MLflow and Optuna; the folds
are cut without scikit-learn), with no garbage collection at all, and the scikit-learn side reports how long its own
imports and its ``fit`` took: the summary prints optiflow's import floor against scikit-learn's whole
search, the part of the goal (at most 1.2x) that those imports alone take.

Then two figures behind the ratio: the bookkeeping cost of one tracked run (a 1-epoch
``train()`` call's wall time minus its epoch time) and the per-step overhead of the loop on a
tiny model against a bare loop (benchmarks/bench_overhead.py, 2 rounds).

    python benchmarks/bench_search.py                # 3 rounds
    python benchmarks/bench_search.py --rounds 5 --n-jobs 2
    python benchmarks/bench_search.py --short        # one round, no extras: a quick look, not a result
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conditions import Round, comparable_only, machine_line

HERE = Path(__file__).resolve().parent
SPACE = ["hidden=int:32:256", "lr=choice:0.001,0.01,0.1", "epochs=int:10:50", "batch_size=int:32:128"]

SKLEARN = """
import sys, json, time
began = time.perf_counter()
import numpy as np
from scipy.stats import randint
from sklearn.datasets import load_digits
from sklearn.model_selection import RandomizedSearchCV, train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
import warnings
warnings.filterwarnings("ignore")
seed = int(sys.argv[1])
train_index, test_index = json.loads(sys.argv[2])
x, y = load_digits(return_X_y=True)
space = {
    "mlpclassifier__hidden_layer_sizes": [(h,) for h in range(32, 257)],
    "mlpclassifier__learning_rate_init": [0.001, 0.01, 0.1],
    "mlpclassifier__max_iter": randint(10, 51),
    "mlpclassifier__batch_size": randint(32, 129),
}
model = make_pipeline(StandardScaler(), MLPClassifier(solver="adam", random_state=seed))
search = RandomizedSearchCV(model, space, n_iter=10, cv=5, random_state=seed, n_jobs=int(sys.argv[3]))
fitting = time.perf_counter()
search.fit(x[train_index], y[train_index])
fitted = time.perf_counter()
print(json.dumps({"test_accuracy": float(search.score(x[test_index], y[test_index])),
                  "imports": fitting - began, "fit": fitted - fitting}))
"""
FLOOR = "import gc; gc.disable(); import torch, torch._dynamo, mlflow, optuna"


def split_indices(seed: int) -> tuple[list[int], list[int]]:
    """optiflow's seeded test split of digits, as indices, so both sides score the same test samples."""
    import torch

    from optiflow.data import DataContext, split
    from optiflow.plugins import get_registry

    source = get_registry().get("dataset", "digits").build(DataContext(Path("data"), seed))
    index = torch.arange(len(source.x), dtype=torch.float32)
    indexed = type(source)(index.reshape(-1, 1), source.y, source.task, num_classes=source.num_classes)
    splits = split(indexed, 0.0, 0.2, seed)
    return [int(i) for i in splits.x_train.flatten()], [int(i) for i in splits.x_test.flatten()]


def run_sklearn(seed: int, indices: tuple[list[int], list[int]], n_jobs: int) -> tuple[float, float, float]:
    """(wall seconds, test accuracy, seconds of it in ``search.fit``)."""
    import json

    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", SKLEARN, str(seed), json.dumps(indices), str(n_jobs)],
                          check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return seconds, report["test_accuracy"], report["fit"]


def import_floor() -> float:
    """Wall seconds of a fresh process importing what ``optiflow search`` cannot do without (:data:`FLOOR`)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", FLOOR], check=True, capture_output=True)
    return time.perf_counter() - started


def run_optiflow(seed: int, store: str, n_jobs: int) -> tuple[float, float | None]:
    from mlflow.tracking import MlflowClient

    experiment = f"bench-search-{seed}-{time.time_ns()}"
    command = [sys.executable, "-m", "optiflow", "search", "--sampler", "random", "--sampler-seed", str(seed),
               "--n-trials", "10", "--cv", "5", "--metric", "val_accuracy", "--seed", str(seed),
               "--n-jobs", str(n_jobs), "--tracking-uri", store, "--experiment", experiment, "-q",
               "--no-reuse"]  # every trial trains, as scikit-learn's do, even where the sampler repeats one
    for dimension in SPACE:
        command += ["--space", dimension]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    client = MlflowClient(store)
    found = client.get_experiment_by_name(experiment)
    refits = client.search_runs([found.experiment_id], "tags.`optiflow.role` = 'refit'") if found else []
    accuracy = refits[0].data.metrics.get("test_accuracy") if refits else None
    return seconds, accuracy


def bookkeeping(store: str, artifacts: bool = True) -> tuple[float, float]:
    """(wall seconds of a 1-epoch tracked train() call, of which the epoch itself); ``artifacts=False``
    is a search child run (params and metrics, no figures or files)."""
    from optiflow.commands.train import train
    from optiflow.config import RunConfig

    config = RunConfig.from_dict({"epochs": 1, "tracking_uri": store, "experiment": "bench-bookkeeping",
                                  "model": "mlp:hidden=[64]"})
    train(config, log_model=False, artifacts=artifacts)  # warm: imports, store tables, registry
    started = time.perf_counter()
    result = train(config, log_model=False, artifacts=artifacts)
    wall = time.perf_counter() - started
    return wall, result.history["epoch_time"][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions [3]")
    parser.add_argument("--n-jobs", type=int, default=1, help="parallel jobs on both sides [1]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first round [0]")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="seconds to wait before a round for the load to fall to 0.5 per core [60]")
    parser.add_argument("--short", action="store_true",
                        help="one round, without the bookkeeping and step-overhead figures")
    args = parser.parse_args()
    if args.short:
        args.rounds = 1
    print(machine_line())
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    store = f"sqlite:///{tempfile.mkdtemp(prefix='optiflow-bench-search-')}/mlflow.db"
    from optiflow.tracking import client

    client(store)  # the store's tables, created once per project, not inside round 1's timing
    print(f"random search, 10 trials x 5-fold CV, MLP on digits, n_jobs={args.n_jobs}")
    times: dict[str, list[float]] = {"sklearn": [], "optiflow": [], "floor": [], "fit": []}
    accuracy: dict[str, list[float | None]] = {"sklearn": [], "optiflow": []}
    rounds: list[Round] = []
    for round_index in range(args.rounds):
        seed = args.seed + round_index
        indices = split_indices(seed)
        order = ("sklearn", "optiflow") if round_index % 2 == 0 else ("optiflow", "sklearn")
        with Round(f"round {round_index + 1}", settle_seconds=args.settle, quiet=True) as conditions:
            for side in order:
                if side == "sklearn":
                    seconds, score, fit = run_sklearn(seed, indices, args.n_jobs)
                    times["fit"].append(fit)
                else:
                    seconds, score = run_optiflow(seed, store, args.n_jobs)
                times[side].append(seconds)
                accuracy[side].append(score)
            times["floor"].append(import_floor())
        rounds.append(conditions)
        ratio = times["optiflow"][-1] / times["sklearn"][-1]
        scores = "  ".join(f"{side} {accuracy[side][-1]:.4f}" for side in ("sklearn", "optiflow")
                           if accuracy[side][-1] is not None)
        print(f"  round {round_index + 1} (seed {seed}): sklearn {times['sklearn'][-1]:6.1f} s  "
              f"optiflow {times['optiflow'][-1]:6.1f} s  optiflow/sklearn time {ratio:.2f}  "
              f"test accuracy: {scores}\n    sklearn's fit {times['fit'][-1]:.1f} s; optiflow's import floor "
              f"{times['floor'][-1]:.1f} s\n    {conditions.describe()}", flush=True)
    kept, note = comparable_only(rounds, list(range(args.rounds)))
    print(note)
    ratios = [times["optiflow"][i] / times["sklearn"][i] for i in kept]
    print(f"median optiflow/sklearn time: {statistics.median(ratios):.2f} "
          f"(sklearn {statistics.median(times['sklearn'][i] for i in kept):.1f} s, "
          f"optiflow {statistics.median(times['optiflow'][i] for i in kept):.1f} s)")
    floors = [times["floor"][i] / times["sklearn"][i] for i in kept]
    print(f"optiflow's import floor ({FLOOR}): median {statistics.median(times['floor'][i] for i in kept):.1f} s "
          f"= {statistics.median(floors):.2f}x scikit-learn's whole search, whose fit took "
          f"{statistics.median(times['fit'][i] for i in kept):.1f} s")
    for side in ("sklearn", "optiflow"):
        scores = [score for score in (accuracy[side][i] for i in kept) if score is not None]
        shown = f"{statistics.fmean(scores):.4f} (min {min(scores):.4f})" if scores else "n/a (no refit run)"
        print(f"refit test accuracy, {side}: {shown}")
    if args.short:
        return
    for artifacts, what in ((True, "one tracked run"), (False, "one search child run (no --child-artifacts)")):
        wall, epoch = bookkeeping(store, artifacts)
        print(f"bookkeeping of {what}: {wall * 1e3:.0f} ms wall, {epoch * 1e3:.0f} ms of it training, "
              f"{(wall - epoch) * 1e3:.0f} ms the rest")
    overhead = subprocess.run([sys.executable, str(HERE / "bench_overhead.py"), "--rounds", "2"],
                              capture_output=True, text=True, check=True)
    print("tiny-model step overhead (bench_overhead.py): " + overhead.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
