"""Two versions of optiflow on the same commands, in one run: has a change made anything slower?

Issue 22 asks that a redesign show no slowdown "same machine, same run".  This runs each workload as a fresh
process under two checkouts, the older one a ``git worktree`` of ``--old`` made for the run (and removed after),
alternating which goes first round by round:

  train   ``optiflow train`` (the default run: digits, MLP, 20 epochs; store already created)
  cnn     ``optiflow train --model cnn --epochs 5 --batch-size 32`` (digits): the training loop dominates
  search  the seed recipe of ``bench_search.py`` (10 random trials x 5-fold CV, refit), its exact flags

Each checkout runs in its own scratch folder whose MLflow store was created by an untimed warm-up.  A version
whose ``train --help`` offers ``--no-reuse`` gets it, so every round trains.  Each round prints both wall times,
the ratio new/old and the machine's load before and after it (benchmarks/conditions.py: a round counts at no more
than 0.5 per core); the summary gives the median ratio over comparable rounds only, and says so when there are none.

    python benchmarks/bench_versions.py --old 0c183ef                 # 3 rounds of train, cnn and search
    python benchmarks/bench_versions.py --old 0c183ef --workloads train,cnn --rounds 5
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

from bench_search import SPACE
from conditions import Round, comparable_only, machine_line

ROOT = Path(__file__).resolve().parent.parent
SEARCH = ["search", "--sampler", "random", "--sampler-seed", "0", "--n-trials", "10", "--cv", "5",
          "--metric", "val_accuracy", "--seed", "0", *[arg for dimension in SPACE for arg in ("--space", dimension)]]
WORKLOADS = {
    "train": ["train"],
    "cnn": ["train", "--model", "cnn", "--epochs", "5", "--batch-size", "32"],
    "search": SEARCH,
}


class Version:
    """One checkout of optiflow, run from its own scratch folder and store."""

    def __init__(self, label: str, checkout: Path) -> None:
        self.label, self.checkout = label, checkout
        self.folder = Path(tempfile.mkdtemp(prefix=f"optiflow-bench-{label}-"))
        self.env = {**os.environ, "PYTHONPATH": str(checkout), "GIT_PYTHON_REFRESH": "quiet",
                    "MLFLOW_TRACKING_URI": f"sqlite:///{self.folder / 'mlruns' / 'mlflow.db'}"}
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)  # both load their modules compiled, as installed
        helped = subprocess.run([sys.executable, "-m", "optiflow", "train", "--help"], cwd=self.folder,
                                env=self.env, capture_output=True, text=True, check=True).stdout
        self.extra = ["--no-reuse"] if "--no-reuse" in helped else []

    def run(self, workload: str) -> float:
        """Wall seconds of one fresh process of ``workload``."""
        command = [sys.executable, "-m", "optiflow", *WORKLOADS[workload], "-q", "--experiment",
                   f"bench-{workload}-{time.time_ns()}", *self.extra]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=self.folder, env=self.env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{self.label} failed on {workload}: {done.stderr.strip()[-500:]}")
        return seconds


def worktree(revision: str) -> Path:
    """A detached worktree of ``revision`` with the built-in plugins importable as ``optiflow_plugins``."""
    path = Path(tempfile.mkdtemp(prefix="optiflow-bench-old-")) / "checkout"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), revision], check=True,
                   capture_output=True)
    (path / "optiflow_plugins").symlink_to("plugins")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="the git revision to compare this checkout with")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions [3]")
    parser.add_argument("--workloads", default="train,cnn,search", help="comma-separated: train, cnn, search")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="seconds to wait before a round for the load to fall to 0.5 per core [60]")
    args = parser.parse_args()
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if unknown := [w for w in workloads if w not in WORKLOADS]:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    old_checkout = worktree(args.old)
    try:
        versions = [Version(f"old ({args.old})", old_checkout), Version("new (this checkout)", ROOT)]
        print(machine_line())
        for version in versions:
            version.run("train")  # warm-up, untimed: the store's tables, compiled modules, the OS file cache
        times = {(w, v.label): [] for w in workloads for v in versions}
        rounds = []
        for index in range(1, args.rounds + 1):
            order = versions if index % 2 else list(reversed(versions))
            with Round(f"round {index}", settle_seconds=args.settle, quiet=True) as conditions:
                for workload in workloads:
                    for version in order:
                        times[workload, version.label].append(version.run(workload))
            rounds.append(conditions)
            lines = [f"{w} old {times[w, versions[0].label][-1]:.2f} s new {times[w, versions[1].label][-1]:.2f} s "
                     f"new/old {times[w, versions[1].label][-1] / times[w, versions[0].label][-1]:.2f}"
                     for w in workloads]
            print(f"  round {index}: " + "  |  ".join(lines) + f"\n    {conditions.describe()}", flush=True)
        indices, note = comparable_only(rounds, list(range(len(rounds))))
        print(f"\n{note}")
        for workload in workloads:
            if not indices:
                break
            old = statistics.median(times[workload, versions[0].label][i] for i in indices)
            new = statistics.median(times[workload, versions[1].label][i] for i in indices)
            ratios = [times[workload, versions[1].label][i] / times[workload, versions[0].label][i] for i in indices]
            print(f"  {workload}: old {old:.2f} s, new {new:.2f} s, median new/old {statistics.median(ratios):.2f}")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_checkout)],
                       capture_output=True)


if __name__ == "__main__":
    main()
