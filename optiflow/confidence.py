"""How sure a comparison over seeds is: a t-interval of each variant's mean and a paired t-test against a
baseline over the same seeds (scipy.stats), at the 95% level / 5% significance that ``compare`` reports."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

LEVEL = 0.95
ALPHA = 1 - LEVEL
NO_INTERVAL = ("no confidence interval can be given from one seed per variant: "
               "compare over several (--repeats 5)")


@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` values and the two-sided t-interval around it (Student's t, n - 1 degrees of freedom)."""

    mean: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class PairedTest:
    """A variant against the baseline on the seeds both finished: the mean difference (variant - baseline),
    its t-interval, and the two-sided paired t-test's p-value."""

    difference: float
    low: float
    high: float
    p_value: float
    pairs: int

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval | None:
    """The mean's ``level`` t-interval; None with fewer than two finite values (no spread to measure)."""
    from scipy import stats

    finite = [float(v) for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return None
    mean = statistics.fmean(finite)
    half = float(stats.t.ppf((1 + level) / 2, len(finite) - 1)) * statistics.stdev(finite) / math.sqrt(len(finite))
    return Interval(mean, mean - half, mean + half, len(finite))


def paired_test(variant: Mapping[int, float], baseline: Mapping[int, float]) -> PairedTest | None:
    """Paired t-test of ``variant`` against ``baseline`` (both seed -> metric) on their common seeds; None
    with fewer than two pairs.  Differences that are all equal have no spread: p is 1 when they are 0, else 0."""
    from scipy import stats

    seeds = sorted(s for s in set(variant) & set(baseline) if math.isfinite(variant[s]) and math.isfinite(baseline[s]))
    if len(seeds) < 2:
        return None
    differences = [variant[s] - baseline[s] for s in seeds]
    interval = t_interval(differences)
    assert interval is not None
    if len(set(differences)) == 1:
        p_value = 1.0 if differences[0] == 0 else 0.0
    else:
        p_value = float(stats.ttest_rel([variant[s] for s in seeds], [baseline[s] for s in seeds]).pvalue)
    return PairedTest(interval.mean, interval.low, interval.high, p_value, len(seeds))
