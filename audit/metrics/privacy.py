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
(as some tools do) inflates the bound without a multiple-testing correction. :func:`best_of_guess_counts` sweeps a
grid fixed in advance and pays for it: each of the K counts is tested at level p / K (Bonferroni), so the maximum
is still a bound at level p.

**Tighter: Xiang, Wang, Xiao, Tian, Wang 2025** ("Tight privacy audit in one run", arXiv 2509.08704; reference code
``zihangxiang/tight-privacy-audit-in-one-run``, ``onerun/tail.py``). Steinke's test treats every released guess as a
coin with the accuracy of eps-randomized response. Xiang et al. instead hypothesise the mechanism's whole f-DP
trade-off curve (a *family*, here mu-Gaussian DP, or the (eps, delta) curve itself) and account for the auditor
keeping only its r most confident guesses out of n. For a null channel, let gamma be the error probability of the
optimal decoder at an outcome, W the score quantile of the *cut* (the most confident guess not released) and
gammabar(w) the mean error above quantile w. The number of mistakes T among the r released guesses has (their
Theorem 2, an equality)

    P[T <= u] = E_W[ BinCDF(u; r, gammabar(W)) ],      W ~ Beta(n - r, r + 1),

and for r = n (no abstention) P[T <= u] = BinCDF(u; n, e_opt), e_opt = E[gamma]. The bound bisects the family's
parameter theta for the least private null still rejected (P[T <= u] < p) and reports that null's eps at delta.

* ``gdp`` (mu-GDP, P = N(0, 1), Q = N(mu, 1)): with s >= 0 the cut on |x - mu/2|, the error mass above the cut is
  ``G = Phi_bar(s + mu/2)`` and the mass above it ``1 - w = Phi_bar(s + mu/2) + Phi_bar(s - mu/2)``, so gammabar is
  closed form (no discretised channel); eps at delta solves ``delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``
  (Dong, Roth, Su 2022, Corollary 2.13). This assumes the training run's privacy curve *is* Gaussian in shape (true
  for the Gaussian mechanism and, asymptotically, for DP-SGD); it is the bound the paper's table reports.
* ``eps_delta`` (the four-atom (eps, delta) channel, which dominates every (eps, delta)-DP mechanism):
  ``gammabar(w) = (1 - delta - w)_+ / ((1 + e^eps)(1 - w))``. No shape assumption beyond Steinke's; with delta = 0 it
  equals Steinke's binomial tail exactly, so it shows how little the abstention accounting alone buys.

Xiang et al.'s ``compare/steinke.py`` sums ``P[v - i < Bin <= v]`` in the delta term where Appendix D sums
``P[v - i <= Bin < v]``; their Steinke column therefore differs from :func:`one_run_p_value` where that term matters
(n = 1000, r = 100, u = 1: 3.0052 there, 3.0028 here). The tight bounds below reproduce their column "ours".

**Mahloujifar, Melis, Chaudhuri 2025** ("Auditing f-Differential Privacy in One Run", ICML, PMLR 267:42615; arXiv
2410.22235; reference code ``facebookresearch/PrivacyGuard``, ``privacy_guard/analysis/mia/fdp_analysis_node.py``, from
the authors' lab; only the paper's abstract could be read from here, so the recursion below is the reference code's,
restated). The same guessing game (m fair-coin canaries, r guesses after looking, v right), tested against a
hypothesised trade-off curve f instead of an (eps, delta) pair. For the mu-GDP curve, write
``fbar(x) = Phi(Phi^-1(x) - mu)`` (the curve read as ``fbar(x) = f(1 - x)``). With tau = p r / m, start at
``r_v = tau v / r``, ``h_v = tau (r - v) / r`` and recurse down to i = 0:

    h_i = max(h_{i+1}, fbar(r_{i+1})),    r_i = r_{i+1} + (i / (r - i)) (h_i - h_{i+1});

the reference rejects the null at level p when ``r_0 + h_0 > r / m``. Both sequences only grow as i falls, so the
scan stops at the first index past ``r / m``, and a smaller mu (a more private null) grows them faster: the rejected
mu form an interval [0, mu*), found by bisection. The bound is mu*-GDP's eps at delta (the Dong, Roth, Su formula
above). This module departs from the reference code in two places, on purpose: the reference scans mu = 1 / sigma
on the grid sigma = 0.001 + 0.01 i (i < 1000) and
reports eps at the first rejected grid point, so its values sit up to one grid step below the bisection's (3.2906
where the bisection gives 3.2956, at m = 100, r = 80, v = 70, delta = 1e-6); and when no grid point is rejected it
reports the grid's last point (eps 0.341 at delta = 1e-5 for 50 right of 100, pure chance) where this module reports 0.
The reference's game abstains as Steinke's does (the auditor picks which r canaries to guess on after seeing the
scores), so the counts (m, r, v) are the ones every method here takes; the reference's tutorial sweeps r and keeps
the best without a correction, where :func:`best_of_guess_counts` pays Bonferroni. It assumes the run's privacy
curve is Gaussian in shape (as ``xiang_gdp`` does) and the fair coins; alphabet k = 2 (member or not: the
recursion's ``(k - 1) fbar``).

On the same guesses (n, r, u = r - v) the ``gdp`` bound is never below Steinke's on the grid the tests sweep; both
assume each canary was included by an independent fair coin. ``mahloujifar_fdp`` sits between the two where the
guesses show something (1000 canaries, 90 of 100 right, delta 1e-5: Steinke 1.626, f-DP 2.456, Xiang 3.164) but is
not always above Steinke's: near zero it can fall below (measured on 266 rows, m 12..1000: 3 below, by at most
0.006, e.g. 60 of 100 right on 1000 canaries, 0.0435 against 0.0495). No ordering is proven here; the tests assert
only what they measure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, special, stats


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
    if v == 0 or delta == 0.0:
        return min(1.0, tail)
    # window_i = P[v - i <= Bin(r, q) < v] for i = 1..v: a running sum of pmf(v-1), pmf(v-2), ..., the paper's loop
    window = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    worst = float(np.max(window / np.arange(1, v + 1)))
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


# ------------------------------------------------------------------------------------- Xiang et al. 2025


class NullChannel(Protocol):
    """A hypothesised mechanism, as the auditor's optimal error profile (see the module docstring)."""

    @property
    def e_opt(self) -> float: ...
    def gammabar(self, w: np.ndarray) -> np.ndarray: ...
    def epsilon(self, delta: float) -> float: ...


@dataclass(frozen=True)
class GaussianChannel:
    """mu-GDP: P = N(0, 1), Q = N(mu, 1); the optimal decoder errs with probability 1 / (1 + e^|mu x - mu^2/2|)."""

    mu: float
    table_points: int = 4_001
    """Points of the table over the cut s in [0, mu/2 + 12] (1 - w reaches 1e-33 there); 4001 keep the tail's relative
    error near 1e-6, far below what moves a bound in its fourth decimal."""

    @property
    def e_opt(self) -> float:
        return float(stats.norm.sf(self.mu / 2))

    def gammabar(self, w: np.ndarray) -> np.ndarray:
        """Mean error above quantile w, from a table over the cut s (log space: 1 - w reaches 1e-30 and below)."""
        half = self.mu / 2
        s = np.linspace(0.0, half + 12.0, self.table_points)
        log_above = np.logaddexp(stats.norm.logsf(s + half), stats.norm.logsf(s - half))  # log(1 - w(s)), 0 at s = 0
        log_gbar = stats.norm.logsf(s + half) - log_above
        x = -np.log1p(-np.asarray(w, dtype=np.float64))  # -log(1 - w), increasing in w like -log_above in s
        return np.exp(np.interp(x, -log_above, log_gbar))

    def epsilon(self, delta: float) -> float:
        """Smallest eps with delta(eps) <= delta on the mu-GDP curve (0 when delta(0) already is)."""
        mu = self.mu
        if mu <= 0:
            return 0.0

        if delta <= 0:
            raise ValueError("a mu-GDP mechanism with mu > 0 is (eps, 0)-DP for no finite eps: state delta > 0")

        def excess(eps: float) -> float:  # e^eps Phi(b) as exp(eps + log Phi(b)): finite for eps in the thousands
            return float(stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2))) - delta

        if excess(0.0) <= 0:
            return 0.0
        hi = 1.0
        while excess(hi) > 0:
            hi *= 2
        return float(optimize.brentq(excess, 0.0, hi, xtol=1e-12))


@dataclass(frozen=True)
class EpsDeltaChannel:
    """The tight (eps, delta) pair: error 1 / (1 + e^eps) on mass 1 - delta, and a certain give-away on mass delta."""

    eps: float
    delta: float

    @property
    def e_opt(self) -> float:
        return (1.0 - self.delta) / (1.0 + math.exp(self.eps))

    def gammabar(self, w: np.ndarray) -> np.ndarray:
        w = np.asarray(w, dtype=np.float64)
        return np.maximum(1.0 - self.delta - w, 0.0) / ((1.0 + math.exp(self.eps)) * np.maximum(1.0 - w, 1e-300))

    def epsilon(self, delta: float) -> float:
        if delta != self.delta:
            raise ValueError(f"an (eps, delta) channel is stated at delta={self.delta:g}, asked for {delta:g}")
        return self.eps


NullFamily = Literal["gdp", "eps_delta"]


def _log_binom_cdf(u: int, r: int, p: np.ndarray) -> np.ndarray:
    """log P[Bin(r, p) <= u] for each p (the regularised incomplete beta inside scipy; exact into deep tails)."""
    if u >= r:
        return np.zeros_like(p)
    out = np.zeros_like(p)
    positive = p > 0.0  # Bin(r, 0) = 0 <= u for sure
    out[positive] = stats.binom.logcdf(u, r, p[positive])
    return out


def mistakes_tail_one_run(channel: NullChannel, u: int, r: int, n: int, *, nodes: int = 4_001,
                          width_sd: float = 18.0) -> float:
    """P[T <= u] under ``channel``: at most ``u`` mistakes among the ``r`` most confident of ``n`` guesses.

    ``E_W[BinCDF(u; r, gammabar(W))]`` with W ~ Beta(n - r, r + 1), integrated by the trapezoid rule on ``nodes``
    points spanning the Beta's mean +- ``width_sd`` standard deviations, in log space with one shift (the integrand
    underflows for very private nulls, where the answer is 0 to double precision).
    """
    if not 0 <= u <= r <= n:
        raise ValueError(f"need 0 <= mistakes ({u}) <= guesses ({r}) <= canaries ({n})")
    if r == n:  # nothing abstained: no cut
        return float(np.exp(_log_binom_cdf(u, r, np.array([channel.e_opt]))[0]))
    a, b = float(n - r), float(r + 1)
    mean, sd = a / (a + b), math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    w = np.linspace(max(1e-15, mean - width_sd * sd), min(1 - 1e-15, mean + width_sd * sd), nodes)
    log_integrand = stats.beta.logpdf(w, a, b) + _log_binom_cdf(u, r, np.clip(channel.gammabar(w), 0.0, 0.5))
    top = float(np.max(log_integrand))
    if top == -math.inf:
        return 0.0
    return min(1.0, math.exp(top) * float(np.trapezoid(np.exp(log_integrand - top), w)))


def _null(family: NullFamily, theta: float, delta: float) -> NullChannel:
    if family == "gdp":
        return GaussianChannel(theta)
    if family == "eps_delta":
        return EpsDeltaChannel(theta, delta)
    raise ValueError(f"unknown null family {family!r}: choose 'gdp' or 'eps_delta'")


def epsilon_lower_bound_tight(n: int, r: int, v: int, *, family: NullFamily = "gdp", delta: float = 0.0,
                              p_value: float = 0.05, tolerance: float = 1e-7, theta_max: float = 64.0) -> float:
    """Xiang et al.'s eps lower bound from ``v`` correct of the ``r`` most confident guesses on ``n`` canaries.

    The family's parameter (mu for ``gdp``, eps for ``eps_delta``) is bisected to ``tolerance`` for the least private
    null whose tail ``P[T <= r - v]`` is still below ``p_value``; that null's eps at ``delta`` is returned (0 if even
    the perfectly private null is not rejected). The search stops at ``theta_max`` (mu = 64 is eps > 2000).
    """
    _check(n, r, v, delta)
    if not 0.0 < p_value < 1.0:
        raise ValueError(f"p_value must lie in (0, 1), got {p_value}")
    if family == "gdp" and delta <= 0:
        raise ValueError("the mu-GDP family has no finite eps at delta = 0: state delta > 0")
    u = r - v

    def rejected(theta: float) -> bool:
        return mistakes_tail_one_run(_null(family, theta, delta), u, r, n) < p_value

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, 2 * hi
        if hi > theta_max:  # lo is still rejected: report it, a floor of the search, not a crossing
            return _null(family, lo, delta).epsilon(delta)
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return _null(family, lo, delta).epsilon(delta)


# ------------------------------------------------------------------------- Mahloujifar, Melis, Chaudhuri 2025


def fdp_one_run_rejects(mu: ArrayLike, m: int, r: int, v: int, *, p_value: float = 0.05) -> np.ndarray:
    """Whether ``v`` correct of ``r`` guesses on ``m`` canaries reject each mu-GDP null at level ``p_value``.

    Mahloujifar et al.'s recursion (module docstring), run for every mu of the array at once; a null stays rejected
    once ``r_i + h_i`` passes ``r / m`` (both only grow), which also keeps ``Phi^-1`` away from arguments above 1.
    """
    _check(m, r, v, 0.0)
    if not 0.0 < p_value < 1.0:
        raise ValueError(f"p_value must lie in (0, 1), got {p_value}")
    mus = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    if r == 0 or v == 0:  # r_0 + h_0 = tau <= r / m: nothing is rejected
        return np.zeros(mus.shape, dtype=bool)
    tau, cap = p_value * r / m, r / m
    rr = np.full(mus.shape, tau * v / r)
    h = np.full(mus.shape, tau * (r - v) / r)
    rejected = rr + h > cap
    for i in range(v - 1, -1, -1):
        h_next = np.maximum(h, special.ndtr(special.ndtri(np.minimum(rr, 1.0)) - mus))
        rr = rr + (i / (r - i)) * (h_next - h)
        h = h_next
        rejected |= rr + h > cap
        if rejected.all():
            break
    return rejected


def epsilon_lower_bound_fdp(m: int, r: int, v: int, *, delta: float, p_value: float = 0.05, tolerance: float = 1e-7,
                            mu_max: float = 64.0, points: int = 33) -> float:
    """Mahloujifar et al.'s eps lower bound: the largest mu-GDP null that ``v`` of ``r`` guesses on ``m`` canaries
    reject at level ``p_value``, as eps at ``delta`` (0 if even mu = 0, perfect privacy, is not rejected).

    mu* is bracketed in [0, ``mu_max``] and narrowed ``points - 1``-fold a round (all points in one vectorised
    recursion) to ``tolerance``; a rejected ``mu_max`` (eps > 2000) is reported as the floor of the search.
    """
    _check(m, r, v, delta)
    if delta <= 0:
        raise ValueError("the mu-GDP family has no finite eps at delta = 0: state delta > 0")
    if not fdp_one_run_rejects(0.0, m, r, v, p_value=p_value)[0]:
        return 0.0
    if fdp_one_run_rejects(mu_max, m, r, v, p_value=p_value)[0]:
        return GaussianChannel(mu_max).epsilon(delta)
    lo, hi = 0.0, mu_max
    while hi - lo > tolerance:
        grid = np.linspace(lo, hi, points)
        rejected = fdp_one_run_rejects(grid[1:-1], m, r, v, p_value=p_value)
        k = int(np.argmin(rejected)) if not rejected.all() else len(rejected)  # first not rejected (a prefix is)
        lo, hi = float(grid[k]), float(grid[k + 1])
    return GaussianChannel(lo).epsilon(delta)


# ------------------------------------------------------------------------ methods side by side, abstention

BoundMethod = Literal["steinke", "xiang_gdp", "xiang_eps_delta", "mahloujifar_fdp"]
BOUND_METHODS: dict[str, str] = {
    "steinke": "Steinke, Nasr, Jagielski 2023 (binomial test, any (eps, delta)-DP mechanism)",
    "xiang_gdp": "Xiang et al. 2025 (tail of the r most confident guesses under a mu-GDP null, eps at delta)",
    "xiang_eps_delta": "Xiang et al. 2025 (the same tail under the (eps, delta) null: no shape assumption)",
    "mahloujifar_fdp": "Mahloujifar, Melis, Chaudhuri 2025 (f-DP recursion against a mu-GDP null, eps at delta)",
}
GAUSSIAN_NULL_METHODS = frozenset({"xiang_gdp", "mahloujifar_fdp"})
"""Methods whose null is a mu-GDP curve: no finite eps at delta = 0, so they need delta > 0."""


def epsilon_lower_bound_by(method: str, m: int, r: int, v: int, *, delta: float = 0.0, p_value: float = 0.05) -> float:
    """The eps lower bound of one named method (``BOUND_METHODS``) on the same observation (m, r, v)."""
    if method == "steinke":
        return epsilon_lower_bound_one_run(m, r, v, delta=delta, p_value=p_value)
    if method == "xiang_gdp":
        return epsilon_lower_bound_tight(m, r, v, family="gdp", delta=delta, p_value=p_value)
    if method == "xiang_eps_delta":
        return epsilon_lower_bound_tight(m, r, v, family="eps_delta", delta=delta, p_value=p_value)
    if method == "mahloujifar_fdp":
        return epsilon_lower_bound_fdp(m, r, v, delta=delta, p_value=p_value)
    raise ValueError(f"unknown bound method {method!r}: choose one of {', '.join(BOUND_METHODS)}")


@dataclass(frozen=True)
class BestOfGuessCounts:
    """The best bound over a grid of guess counts fixed in advance, each tested at ``p_value / len(grid)``."""

    method: str
    eps_lower_bound: float
    guesses: int
    correct: int
    m: int
    grid: tuple[int, ...]
    level: float
    """The per-count level actually used: ``p_value / len(grid)``."""


def default_guess_grid(m: int, *, steps: int = 10) -> tuple[int, ...]:
    """``steps`` guess counts evenly spaced in (0, m] (10%, 20%, ..., 100% of the canaries), distinct, at least 2."""
    return tuple(sorted({max(2, min(m, round(m * (i + 1) / steps))) for i in range(steps)})) if m >= 2 else (m,)


def best_of_guess_counts(scores: ArrayLike, is_member: ArrayLike, *, method: str = "steinke",
                         grid: Sequence[int] | None = None, delta: float = 0.0, p_value: float = 0.05) -> BestOfGuessCounts:
    """Abstention as Panda et al. (2025) and Steinke et al. use it, paid for: for each r in ``grid`` guess "in" for the
    top r // 2 and "out" for the bottom r - r // 2, bound at level ``p_value / len(grid)``, keep the largest.

    A union bound over the grid makes the maximum a valid bound at ``p_value``; without the division the sweep
    would test len(grid) hypotheses and report the luckiest.
    """
    m = int(np.asarray(is_member).size)
    counts = tuple(grid) if grid is not None else default_guess_grid(m)
    if not counts or any(not 1 <= r <= m for r in counts):
        raise ValueError(f"every guess count must lie in [1, {m}], got {counts}")
    level = p_value / len(counts)
    best: tuple[float, int, int] = (-1.0, 0, 0)
    for r in counts:
        guesses, correct = one_run_guesses(scores, is_member, k_pos=r // 2, k_neg=r - r // 2)
        eps = epsilon_lower_bound_by(method, m, guesses, correct, delta=delta, p_value=level)
        if eps > best[0]:
            best = (eps, guesses, correct)
    return BestOfGuessCounts(method=method, eps_lower_bound=best[0], guesses=best[1], correct=best[2], m=m, grid=counts,
                             level=level)


# ------------------------------------------------------------------- against the accountant (DP-SGD runs)

EPS_LB_PREFIX = "privacy.eps_lb/"


@dataclass(frozen=True)
class AccountantComparison:
    """Each one-run lower bound beside the DP accountant's eps: ``tightness = eps_lb / eps_accountant``.

    A sound bound has tightness <= 1 (at the bound's confidence 1 - p); Panda et al. 2025 reach about 0.25 (eps ~1
    audited for a model trained at eps = 4), Xiang et al. 2025 about 0.67 on simulated Gaussian mechanisms.
    """

    eps_accountant: float
    tightness: dict[str, float]
    """``<method>`` (as in ``privacy.eps_lb/<method>``) -> eps_lb / eps_accountant."""

    @property
    def tightness_max(self) -> float:
        return max(self.tightness.values(), default=0.0)

    @property
    def sound(self) -> bool:
        """No bound above the accountant's eps (a bound above it means a broken guarantee or a broken audit)."""
        return self.tightness_max <= 1.0


def compare_with_accountant(eps_accountant: float, bounds: dict[str, float]) -> AccountantComparison:
    """``bounds``: metric key (``privacy.eps_lb/<method>``; other keys ignored) -> eps lower bound."""
    if not (eps_accountant > 0 and math.isfinite(eps_accountant)):
        raise ValueError(f"the accountant's eps must be a positive number, got {eps_accountant}")
    tight = {key.removeprefix(EPS_LB_PREFIX): value / eps_accountant for key, value in sorted(bounds.items())
             if key.startswith(EPS_LB_PREFIX)}
    return AccountantComparison(eps_accountant=eps_accountant, tightness=tight)


def sampling_statement(inclusion: str) -> str:
    """What the run satisfies of the bounds' and the accountant's sampling assumptions (for ``metric_notes``)."""
    records = ("eps_accountant: Opacus' accountant for DP-SGD with Poisson sampling of training records (each record "
               "joins each step independently with probability q, as the accountant assumes; met by construction); "
               "a canary planted k times is k records, covered only by the group eps (about k eps)")
    if inclusion == "coin":
        canaries = ("canaries: each included by its own fair coin (canaries.inclusion=coin), the independence the one-run "
                    "bounds assume (Steinke et al. 2023, Xiang et al. 2025)")
    else:
        canaries = ("canaries: a fixed split (exactly members_per_tier per tier, a random permutation), not the independent "
                    "fair coins the one-run bounds assume; read the bounds as indicative (canaries.inclusion=coin fixes it)")
    return f"{records}. {canaries}."
