"""What a short ``optiflow train`` costs beyond its training: start-up, imports, bookkeeping, export.

Each round runs, as fresh processes in a throw-away folder whose MLflow store already exists (its
tables and the experiment are created by an untimed warm-up run, as in a project that has trained
before; it also caches optiflow's compiled modules, as installing optiflow does), in alternating order (R F H E T A, A T E H F R, ...):

  R  ``python -c "import torch, mlflow"``: the reference, what any tracked PyTorch run imports
  F  ``python -c "import gc; gc.disable(); import torch, torch._dynamo, mlflow"``: the floor of a default train,
     which cannot avoid ``torch._dynamo`` (every ``torch.optim`` step imports it, and so does ``torch.export``,
     which writes the logged model through ``mlflow.pytorch``), imported with no garbage collection at all (the
     command keeps its collector from scanning what its imports make: optiflow.host)
  H  ``optiflow --help``
  E  ``optiflow train --epochs 1`` (digits, default MLP): wall time against its logged training time
  T  ``optiflow train`` (the default run: digits, MLP, 20 epochs): the same
  A  ``OPTIFLOW_EXPORT_AHEAD=0 optiflow train``: the same run exporting its model itself, after training (T has a
     fork of its process trace it while it trains: optiflow.export_ahead); the summary prints T/A

The training time of E and T is the sum of their logged ``epoch_time`` metric; the fixed cost is the
wall time minus it, printed against R (issue 24's measure) and against F (what is left above the imports).  Each round prints the machine's load average before and after it and whether it
counts (benchmarks/conditions.py: at most 0.5 per core); the summary uses comparable rounds only,
and says so when there are none.  Issue 24's goals: T at most 4.5 s wall, the fixed cost of T at most
1.5x R.  The summary says when F alone is above the wall-time goal: then no default train can meet it on
this machine.

    python benchmarks/bench_startup.py              # 5 rounds
    python benchmarks/bench_startup.py --short      # 2 rounds, a quick look
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

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = "bench-startup"
STORE = "sqlite:///mlruns/mlflow.db"  # the project-local default store, relative to the run folder
VARIANTS = {
    "R": ("python -c 'import torch, mlflow' (reference)", [sys.executable, "-c", "import torch, mlflow"]),
    "F": ("python -c 'import gc; gc.disable(); import torch, torch._dynamo, mlflow' (the floor)",
          [sys.executable, "-c", "import gc; gc.disable(); import torch, torch._dynamo, mlflow"]),
    "H": ("optiflow --help", [sys.executable, "-m", "optiflow", "--help"]),
    "E": ("optiflow train --epochs 1", [sys.executable, "-m", "optiflow", "train", "--epochs", "1"]),
    "T": ("optiflow train (default, 20 epochs)", [sys.executable, "-m", "optiflow", "train"]),
    "A": ("OPTIFLOW_EXPORT_AHEAD=0 optiflow train (its model exported after training)",
          [sys.executable, "-m", "optiflow", "train"]),
}
SWITCHES = {"A": {"OPTIFLOW_EXPORT_AHEAD": "0"}}
GOAL_WALL = 4.5
GOAL_FIXED_RATIO = 1.5


def environment() -> dict[str, str]:
    """This checkout's optiflow first on the path, MLflow's git probe quiet, the run's store and experiment, and
    bytecode written: the untimed warm-up caches this checkout's compiled modules as an installed package has
    them (with PYTHONDONTWRITEBYTECODE set, every timed process compiled optiflow's ~50 modules, ~0.1 s of
    CPU, while torch and MLflow load theirs compiled)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    inherited = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**inherited, "PYTHONPATH": path, "GIT_PYTHON_REFRESH": "quiet", "MLFLOW_TRACKING_URI": STORE}


def run(key: str, folder: Path) -> tuple[float, float | None]:
    """(wall seconds, logged training seconds or None) of one fresh process of variant ``key``."""
    command = list(VARIANTS[key][1])
    if key in "ETA":
        command += ["--experiment", EXPERIMENT, "--no-reuse"]  # every round trains: a reused run would time nothing
    started = time.perf_counter()
    subprocess.run(command, cwd=folder, env={**environment(), **SWITCHES.get(key, {})}, check=True,
                   capture_output=True)
    wall = time.perf_counter() - started
    return wall, (training_seconds(folder) if key in "ETA" else None)


def training_seconds(folder: Path) -> float:
    """The summed ``epoch_time`` of the latest run in the benchmark's experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    [latest] = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return sum(m.value for m in client.get_metric_history(latest.info.run_id, "epoch_time"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions of R F H E T A [5]")
    parser.add_argument("--short", action="store_true", help="2 rounds: a quick look, not a result")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="seconds to wait before a round for the load to fall to 0.5 per core [60]")
    args = parser.parse_args()
    rounds_wanted = 2 if args.short else args.rounds
    print(machine_line())
    for key, (what, _) in VARIANTS.items():
        print(f"  {key}: {what}")
    folder = Path(tempfile.mkdtemp(prefix="optiflow-bench-startup-"))
    run("E", folder)  # warm-up, untimed: the store's tables and the experiment, compiled modules, the OS file cache
    walls: dict[str, list[float]] = {key: [] for key in VARIANTS}
    trained: dict[str, list[float]] = {"E": [], "T": [], "A": []}
    rounds = []
    for index in range(1, rounds_wanted + 1):
        order = list(VARIANTS) if index % 2 else list(reversed(VARIANTS))
        with Round(f"round {index}", settle_seconds=args.settle, quiet=True) as conditions:
            for key in order:
                wall, training = run(key, folder)
                walls[key].append(wall)
                if training is not None:
                    trained[key].append(training)
        rounds.append(conditions)
        line = "  ".join(f"{k} {walls[k][-1]:.2f} s" for k in VARIANTS)
        fixed = "  ".join(f"{k} trains {trained[k][-1]:.2f} s" for k in trained)
        print(f"  round {index}: {line}  ({fixed})\n    {conditions.describe()}", flush=True)
    indices, note = comparable_only(rounds, list(range(len(rounds))))
    print(f"\n{note}")

    def median(values: list[float]) -> float:
        return statistics.median(values[i] for i in indices)

    reference, floor = median(walls["R"]), median(walls["F"])
    print(f"  R import torch, mlflow: {reference:.2f} s")
    print(f"  F import torch, torch._dynamo, mlflow, no collection: {floor:.2f} s = {floor / reference:.2f}x R")
    print(f"  H optiflow --help: {median(walls['H']):.2f} s")
    for key in ("E", "T", "A"):
        fixed = [walls[key][i] - trained[key][i] for i in range(len(walls[key]))]
        print(f"  {key} {VARIANTS[key][0]}: {median(walls[key]):.2f} s wall, {median(trained[key]):.2f} s training, "
              f"fixed cost {median(fixed):.2f} s = {median(fixed) / reference:.2f}x R = {median(fixed) / floor:.2f}x F")
    pairs = [walls["T"][i] / walls["A"][i] for i in indices]
    print(f"  T/A, the model traced beside the run against exported after it: median {statistics.median(pairs):.2f} "
          f"({', '.join(f'{p:.2f}' for p in pairs)})")
    fixed_t = median([walls["T"][i] - trained["T"][i] for i in range(len(walls["T"]))])
    print(f"  goals: T wall {median(walls['T']):.2f} s (<= {GOAL_WALL} s), "
          f"T fixed cost {fixed_t / reference:.2f}x R (<= {GOAL_FIXED_RATIO}x)")
    if floor > GOAL_WALL:
        print(f"  the floor F alone ({floor:.2f} s) is above the {GOAL_WALL} s goal: no default train meets it here")


if __name__ == "__main__":
    main()
