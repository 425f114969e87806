"""Small statistics shared by the metrics: exact binomial intervals.

Every rate the harness reports (TPR at a fixed FPR, extraction rates, the fraction of a secret space that beats a
canary) is a binomial proportion measured on few trials, so it carries an exact Clopper-Pearson interval
(Clopper and Pearson 1934, "The use of confidence or fiducial limits illustrated in the case of the binomial"):

    lower = Beta^-1(alpha/2; k, n - k + 1)      (0 when k = 0)
    upper = Beta^-1(1 - alpha/2; k + 1, n - k)   (1 when k = n)

with alpha = 1 - confidence. The interval is conservative: its coverage is at least ``confidence`` for every p.
"""

from __future__ import annotations

from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Proportion:
    """``successes`` out of ``trials`` with its exact two-sided interval."""

    successes: int
    trials: int
    low: float
    high: float
    confidence: float

    @property
    def rate(self) -> float:
        return self.successes / self.trials if self.trials else float("nan")


def clopper_pearson(successes: int, trials: int, *, confidence: float = 0.95) -> Proportion:
    """Exact two-sided binomial interval for ``successes / trials`` (see the module docstring)."""
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes ({successes}) <= trials ({trials})")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if trials == 0:
        return Proportion(successes, trials, 0.0, 1.0, confidence)
    alpha = 1.0 - confidence
    low = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return Proportion(successes, trials, low, high, confidence)
