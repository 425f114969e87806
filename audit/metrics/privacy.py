"""Empirical differential-privacy lower bound from one training run (Steinke, Nasr, Jagielski 2023, "Privacy auditing
with one (1) training run", NeurIPS; arXiv 2305.08846).

Procedure: m canaries, each included independently with probability 1/2; train once; an auditor guesses "in" for
its k+ highest-scoring canaries and "out" for its k- lowest and abstains on the rest: r = k+ + k- guesses, v of them
correct. If training is (eps, delta)-DP, the number of correct guesses is dominated by Binomial(r, q) with
q = e^eps / (1 + e^eps), up to a delta term. The exact p-value of Appendix D (the same formula as the paper's code) is

    p(m, r, v, eps, delta) = min(1, P[Bin(r, q) >= v] + 2 m delta max_{i=1..v} (1/i) P[v - i <= Bin(r, q) < v]),

and the lower bound is eps_LB = sup{eps >= 0 : p(m, r, v, eps, delta) < p}: the smallest eps the observation does
not reject at level p. Even perfect guessing cannot show more than the **ceiling** eps_LB(v = r); with delta = 0 it is
``logit(p^(1/r))`` (3.49 for r = 100, p = 0.05), so the ceiling is always reported beside the bound.

The guess counts k+ and k- must be fixed before looking at the scores; sweeping them and keeping the best bound
(as some tools do) inflates the bound without a multiple-testing correction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats


def _check(m: int, r: int, v: int, delta: float) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must lie in [0, 1], got {delta}")


def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float = 0.0) -> float:
    """p-value of observing >= v correct out of r guesses under (eps, delta)-DP with m randomized canaries."""
    _check(m, r, v, delta)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    q = 1.0 / (1.0 + math.exp(-eps))
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    worst = 0.0
    window = 0.0  # P[v - i <= Bin(r, q) < v]
    for i in range(1, v + 1):
        window += float(stats.binom.pmf(v - i, r, q))
        worst = max(worst, window / i)
    return min(1.0, tail + 2.0 * m * delta * worst)


def epsilon_lower_bound_one_run(m: int, r: int, v: int, *, delta: float = 0.0, p_value: float = 0.05,
                                tolerance: float = 1e-9) -> float:
    """Largest eps that ``v`` correct of ``r`` guesses on ``m`` canaries rejects at level ``p_value`` (0 if none).

    The p-value rises with eps, so bracket by unit steps and bisect to ``tolerance``.
    """
    _check(m, r, v, delta)
    if not 0.0 < p_value < 1.0:
        raise ValueError(f"p_value must lie in (0, 1), got {p_value}")
    if one_run_p_value(m, r, v, 0.0, delta) >= p_value:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < p_value:
        lo, hi = hi, hi + 1.0
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if one_run_p_value(m, r, v, mid, delta) < p_value:
            lo = mid
        else:
            hi = mid
    return lo


def epsilon_ceiling_one_run(m: int, r: int, *, delta: float = 0.0, p_value: float = 0.05) -> float:
    """The most ``r`` guesses can ever show: the bound with every guess correct."""
    return epsilon_lower_bound_one_run(m, r, r, delta=delta, p_value=p_value)


@dataclass(frozen=True)
class OneRunAudit:
    m: int
    guesses: int
    correct: int
    eps_lower_bound: float
    eps_ceiling: float
    delta: float
    p_value: float


def one_run_guesses(scores: ArrayLike, is_member: ArrayLike, *, k_pos: int, k_neg: int) -> tuple[int, int]:
    """Guess "in" for the ``k_pos`` highest scores and "out" for the ``k_neg`` lowest; return (guesses, correct).

    Ties are broken by position (a stable sort), so the result is deterministic.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    member = np.asarray(is_member, dtype=bool).ravel()
    if s.shape != member.shape:
        raise ValueError("scores and is_member must have the same length")
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > s.size:
        raise ValueError(f"k_pos ({k_pos}) + k_neg ({k_neg}) must lie in [0, {s.size}]")
    order = np.argsort(-s, kind="stable")
    guessed_in = order[:k_pos]
    guessed_out = order[s.size - k_neg:] if k_neg else order[:0]
    correct = int(np.count_nonzero(member[guessed_in])) + int(np.count_nonzero(~member[guessed_out]))
    return k_pos + k_neg, correct


def one_run_audit(scores: ArrayLike, is_member: ArrayLike, *, k_pos: int, k_neg: int, delta: float = 0.0,
                  p_value: float = 0.05) -> OneRunAudit:
    """Guess, count, and bound: eps_LB beside the ceiling its number of guesses allows."""
    m = int(np.asarray(is_member).size)
    r, v = one_run_guesses(scores, is_member, k_pos=k_pos, k_neg=k_neg)
    return OneRunAudit(m=m, guesses=r, correct=v,
                       eps_lower_bound=epsilon_lower_bound_one_run(m, r, v, delta=delta, p_value=p_value),
                       eps_ceiling=epsilon_ceiling_one_run(m, r, delta=delta, p_value=p_value), delta=delta, p_value=p_value)
