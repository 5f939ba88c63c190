"""How good are the time estimates: the ETA a search or comparison prints after 20% of its work, and the
``--dry-run`` estimate, against the real total.

Two workloads, each a fresh ``optiflow`` process with plain progress lines (``-q``), each line timed as it
arrives: the seed recipe (benchmarks/bench_search.py's SPACE: a random search of 10 trials x 5 folds on
digits) and a comparison of 4 optimizers x 3 seeds.  After 20% of the units (trials, runs) the line's time
since the process started plus its ETA is the predicted total; the real total is the time of the last unit's
line.  The dry run's estimate is compared with the same total.  The machine's load before and after each
workload is printed (benchmarks/conditions.py): the ratio of two times taken in the same process is what
counts, but a machine whose load changes midway moves it.

    python benchmarks/bench_eta.py
    python benchmarks/bench_eta.py --only compare --rounds 3
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time

from bench_search import SPACE
from conditions import Round, machine_line

from optiflow.tracking import client
from optiflow.values import parse_duration

WORKLOADS = {
    "search": ["search", "--sampler", "random", "--sampler-seed", "0", "--n-trials", "10", "--cv", "5",
               "--metric", "val_accuracy", "--no-refit", *[a for d in SPACE for a in ("--space", d)]],
    "compare": ["compare", "--vary", "opt=sgd,adam,rmsprop,adamw", "--repeats", "3"],
}
LINE = re.compile(r"^\[(\d+)/(\d+)\].*?(?:ETA (\S+))?$")


def timed_lines(command: list[str]) -> tuple[list[tuple[float, str]], float]:
    """Each stdout line of ``command`` with the seconds since it started, and the command's wall time."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    assert process.stdout is not None
    lines = [(time.perf_counter() - started, line.rstrip("\n")) for line in process.stdout]
    _, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {err.strip().splitlines()[-1:]}")
    return lines, time.perf_counter() - started


def measure(name: str, store: str) -> None:
    base = [sys.executable, "-m", "optiflow", *WORKLOADS[name], "--tracking-uri", store,
            "--experiment", f"bench-eta-{name}-{time.time_ns()}"]
    dry, _ = timed_lines([*base, "--dry-run"])
    estimate = next(parse_duration(line.split(": ", 1)[1].split(" ")[0]) for _, line in dry
                    if line.startswith("estimated total"))
    with Round(name):
        lines, wall = timed_lines([*base, "-q"])
    ticks = [(seconds, LINE.match(line)) for seconds, line in lines if LINE.match(line)]
    total = int(ticks[-1][1].group(2))
    at, match = next((s, m) for s, m in ticks if int(m.group(1)) >= 0.2 * total)
    predicted = at + parse_duration(match.group(3))
    real = ticks[-1][0]
    print(f"{name}: after {match.group(1)}/{total} units at {at:.1f} s the ETA said {match.group(3)}: predicted "
          f"total {predicted:.1f} s, real {real:.1f} s ({predicted / real - 1:+.0%}); dry-run estimate "
          f"{estimate:.1f} s ({estimate / real - 1:+.0%}); command wall time {wall:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=1, help="times to measure each workload [1]")
    args = parser.parse_args()
    print(machine_line())
    store = f"sqlite:///{tempfile.mkdtemp(prefix='optiflow-bench-eta-')}/mlflow.db"
    client(store)  # the store's tables, created once per project, not inside the first workload's timing
    for _ in range(args.rounds):
        for name in [args.only] if args.only else list(WORKLOADS):
            measure(name, store)


if __name__ == "__main__":
    main()
