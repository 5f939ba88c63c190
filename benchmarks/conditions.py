"""Under what load a benchmark round ran, and whether it counts.

A round is *comparable* when the machine was quiet: the 1-minute load average before the round at most
``LIMIT_PER_CORE`` per core (``os.cpu_count()``), and the other processes' CPU use during the round
(the machine's busy CPU time from ``/proc/stat``, steal included, minus this benchmark's own, its
children's included) at most as much.  The load average after the round is printed too, but it counts
the benchmark's own work, so the others' CPU use stands for it in the verdict.  A loaded machine slows
the two sides of a comparison unequally (scikit-learn's multi-threaded BLAS more than single-threaded
small models), so a summary uses comparable rounds only and says so when there are none.

    with Round("round 1") as round_:   # prints "round 1: load 0.08 -> 0.41, ..., comparable" at the end
        ...
    rounds.append(round_)
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from typing import Any

LIMIT_PER_CORE = 0.5


def cores() -> int:
    return os.cpu_count() or 1


def limit() -> float:
    """The load above which a round is not comparable."""
    return LIMIT_PER_CORE * cores()


def load() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def settle(seconds: float) -> float:
    """Wait up to ``seconds`` for the load average to fall to :func:`limit` (the tail of the previous round
    or of something else); returns the load then."""
    deadline = time.monotonic() + seconds
    current = load()
    while current > limit() and time.monotonic() < deadline:
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        current = load()
    return current


def _own_cpu() -> float:
    """CPU seconds of this process and its waited-for children so far."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _machine_busy() -> float | None:
    """Busy CPU seconds of the whole machine so far (user, nice, system, irq, softirq, steal), or None
    where ``/proc/stat`` does not exist."""
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Round:
    """Measures the conditions of one round: ``with Round(label) as r: ...``; then ``r.comparable``."""

    def __init__(self, label: str, *, settle_seconds: float = 0.0, quiet: bool = False) -> None:
        self.label = label
        self.settle_seconds = settle_seconds
        self.quiet = quiet
        self.before = self.after = 0.0
        self.own_cores = 0.0
        self.others_cores: float | None = None
        self.seconds = 0.0

    def __enter__(self) -> Round:
        self.before = settle(self.settle_seconds) if self.settle_seconds else load()
        self._busy, self._own, self._started = _machine_busy(), _own_cpu(), time.monotonic()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = max(time.monotonic() - self._started, 1e-9)
        own = _own_cpu() - self._own
        busy = _machine_busy()
        self.after = load()
        self.own_cores = own / self.seconds
        if busy is not None and self._busy is not None:
            self.others_cores = max(0.0, (busy - self._busy - own) / self.seconds)
        if not self.quiet and exc[0] is None:
            print(f"  {self.label}: {self.describe()}", flush=True)

    @property
    def comparable(self) -> bool:
        others = self.others_cores if self.others_cores is not None else self.after - self.own_cores
        return self.before <= limit() and others <= limit()

    def describe(self) -> str:
        others = f", others {self.others_cores:.2f} cores" if self.others_cores is not None else ""
        verdict = "comparable" if self.comparable else f"NOT comparable (above {LIMIT_PER_CORE} per core)"
        return (f"load {self.before:.2f} -> {self.after:.2f} ({cores()} cores), this benchmark "
                f"{self.own_cores:.2f} cores{others}: {verdict}")


def comparable_only(rounds: Sequence[Round], values: Sequence[Any]) -> tuple[list[Any], str]:
    """The values of the comparable rounds (``values[i]`` belongs to ``rounds[i]``) and a line saying which
    were used; with none comparable, every value and a line that says the summary is not comparable."""
    kept = [value for round_, value in zip(rounds, values) if round_.comparable]
    if kept:
        return kept, f"summary of the {len(kept)} comparable round(s) of {len(rounds)}"
    return list(values), (f"NO comparable round (every one of {len(rounds)} ran with load above "
                          f"{LIMIT_PER_CORE} per core): the summary below uses all of them and is NOT comparable")


def machine_line() -> str:
    """The machine and its load now, for a benchmark's header."""
    import platform

    return (f"machine: {platform.node()}, {platform.processor() or platform.machine()}, {cores()} CPUs, "
            f"Python {platform.python_version()}; load average now {load():.2f} "
            f"(a round counts at <= {limit():.2f}); {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
