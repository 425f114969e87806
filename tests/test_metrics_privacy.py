"""One-run epsilon lower bounds: Steinke, Nasr, Jagielski 2023 and Xiang et al. 2025, on the same guesses."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from audit.metrics import epsilon_ceiling_one_run, epsilon_lower_bound_one_run, one_run_audit, one_run_p_value
from audit.metrics.privacy import (
    BOUND_METHODS,
    EpsDeltaChannel,
    GaussianChannel,
    best_of_guess_counts,
    default_guess_grid,
    epsilon_lower_bound_by,
    epsilon_lower_bound_tight,
    mistakes_tail_one_run,
    one_run_guesses,
)


def _p_value_appendix_d_loop(m, r, v, eps, delta):
    """The Appendix-D p-value as the paper writes it (a loop over i; the module sums cumulatively)."""
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += stats.binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    return min(1.0, beta + alpha * delta * 2 * m)


def test_closed_form_ceiling_without_delta():
    # all r guesses right, delta = 0: p(eps) = q^r, so eps_LB = logit(p^(1/r)); 3.4930 for r = 100 at p = 0.05
    q = 0.05 ** (1 / 100)
    assert epsilon_lower_bound_one_run(1000, 100, 100) == pytest.approx(math.log(q / (1 - q)), abs=1e-7)
    assert epsilon_ceiling_one_run(1000, 100) == pytest.approx(3.4930, abs=5e-5)


@pytest.mark.parametrize(("m", "r", "v", "eps", "delta"),
                         [(1000, 100, 90, 1.5, 1e-5), (500, 50, 40, 0.7, 1e-3), (200, 20, 20, 2.0, 0.0), (100, 10, 3, 0.1, 1e-2)])
def test_p_value_matches_an_independent_implementation(m, r, v, eps, delta):
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(_p_value_appendix_d_loop(m, r, v, eps, delta), rel=1e-12)


def test_bound_is_where_the_p_value_crosses_the_level():
    eps = epsilon_lower_bound_one_run(1000, 100, 90, delta=1e-5)
    assert 0 < eps < epsilon_ceiling_one_run(1000, 100, delta=1e-5)
    assert one_run_p_value(1000, 100, 90, eps - 1e-6, 1e-5) < 0.05 <= one_run_p_value(1000, 100, 90, eps + 1e-6, 1e-5)


def test_delta_lowers_the_bound_and_chance_gives_zero():
    assert epsilon_lower_bound_one_run(10**4, 100, 100, delta=1e-4) < epsilon_lower_bound_one_run(10**4, 100, 100)
    assert epsilon_lower_bound_one_run(100, 100, 50) == 0.0  # coin-flip accuracy proves nothing
    with pytest.raises(ValueError):
        epsilon_lower_bound_one_run(10, 20, 5)


def test_guesses_take_the_top_and_bottom():
    scores = [5, 4, 3, 2, 1, 0]
    member = [True, True, False, True, False, False]
    assert one_run_guesses(scores, member, k_pos=2, k_neg=2) == (4, 4)
    assert one_run_guesses(scores, member, k_pos=3, k_neg=0) == (3, 2)
    audit = one_run_audit(scores, member, k_pos=3, k_neg=3, delta=0.0)
    assert (audit.m, audit.guesses, audit.correct) == (6, 6, 4)  # index 3 (a member) is guessed out
    assert audit.eps_lower_bound <= audit.eps_ceiling


# --------------------------------------------------------------- Xiang et al. 2025, side by side, abstention

# zihangxiang/tight-privacy-audit-in-one-run, compare/RESULTS.txt: (n, r, mistakes u, their bound), Gaussian family,
# delta = 1e-5, 95% confidence; rows from the mu = 0.5, 1 and 2 blocks, with and without abstention
XIANG_GAUSSIAN_ROWS = [(1000, 100, 10, 3.1645), (1000, 250, 36, 3.6327), (1000, 1000, 309, 3.6700),
                       (1000, 100, 1, 5.9018), (1000, 100, 26, 1.1926), (1000, 500, 20, 8.9216),
                       (10000, 1000, 97, 4.0141), (100000, 10000, 967, 4.2662), (100000, 50000, 10343, 4.3144)]


@pytest.mark.parametrize(("n", "r", "u", "expected"), XIANG_GAUSSIAN_ROWS)
def test_tight_bound_reproduces_the_reference_code_table(n, r, u, expected):
    assert epsilon_lower_bound_tight(n, r, r - u, family="gdp", delta=1e-5) == pytest.approx(expected, abs=1e-3)


def test_steinke_reproduces_the_reference_table_where_the_delta_terms_agree():
    # same table, column "Steinke": Gaussian mu = 1, n = 1000, r = 100, u = 10 (and r = 250, u = 36)
    assert epsilon_lower_bound_one_run(1000, 100, 90, delta=1e-5) == pytest.approx(1.6265, abs=1e-3)
    assert epsilon_lower_bound_one_run(1000, 250, 214, delta=1e-5) == pytest.approx(1.4767, abs=1e-3)


def test_gaussian_channel_against_closed_forms():
    ch = GaussianChannel(1.0)
    assert ch.e_opt == pytest.approx(stats.norm.cdf(-0.5), abs=1e-15)
    assert ch.gammabar(np.array([0.0]))[0] == pytest.approx(ch.e_opt, rel=1e-9)  # nothing cut: the mean error
    # the cut at |x - mu/2| = 1: w = 1 - Phi_bar(1.5) - Phi_bar(0.5), gammabar = Phi_bar(1.5) / (1 - w)
    above = stats.norm.sf(1.5) + stats.norm.sf(0.5)
    assert ch.gammabar(np.array([1 - above]))[0] == pytest.approx(stats.norm.sf(1.5) / above, rel=1e-6)
    # mu-GDP at eps: delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Dong, Roth, Su 2022)
    eps = ch.epsilon(1e-5)
    assert stats.norm.cdf(-eps + 0.5) - math.exp(eps) * stats.norm.cdf(-eps - 0.5) == pytest.approx(1e-5, rel=1e-6)
    assert eps == pytest.approx(4.3772, abs=1e-4)  # the table's "true eps" for mu = 1
    with pytest.raises(ValueError, match="delta > 0"):
        ch.epsilon(0.0)


def test_pure_dp_null_without_abstention_is_steinkes_binomial_test():
    # (eps, 0) channel, r = n: P[T <= u] = P[Bin(r, 1/(1+e^eps)) <= u] = P[Bin(r, q) >= v], Steinke's beta term
    for eps, r, u in ((0.5, 40, 10), (2.0, 100, 5)):
        assert mistakes_tail_one_run(EpsDeltaChannel(eps, 0.0), u, r, r) == pytest.approx(
            one_run_p_value(r, r, r - u, eps, 0.0), rel=1e-9)


def test_more_mistakes_are_less_surprising_and_the_tail_is_a_probability():
    ch = GaussianChannel(0.8)
    tails = [mistakes_tail_one_run(ch, u, 50, 400) for u in range(0, 51, 5)]
    assert all(0.0 <= t <= 1.0 for t in tails)
    assert tails == sorted(tails) and tails[-1] == pytest.approx(1.0)


# (m, r, v): small audits like the default recipe's, the abstention corner (r << m), all-correct and coin-flip rows
SAME_GUESSES_GRID = [(12, 12, 12), (12, 6, 6), (40, 10, 9), (40, 40, 30), (100, 25, 20), (100, 100, 70),
                     (300, 50, 45), (300, 300, 160), (1000, 100, 90), (1000, 500, 251)]


@pytest.mark.parametrize(("m", "r", "v"), SAME_GUESSES_GRID)
def test_tight_bounds_are_never_below_steinke_on_the_same_guesses(m, r, v):
    steinke = epsilon_lower_bound_one_run(m, r, v, delta=1e-5)
    assert epsilon_lower_bound_tight(m, r, v, family="gdp", delta=1e-5, tolerance=1e-6) >= steinke - 1e-6
    # the (eps, delta) null makes Steinke's assumption only, so it gains little: abstention accounting alone
    assert epsilon_lower_bound_tight(m, r, v, family="eps_delta", delta=1e-5, tolerance=1e-6) >= steinke - 1e-4


def test_chance_accuracy_proves_nothing_under_any_method():
    for method in BOUND_METHODS:
        assert epsilon_lower_bound_by(method, 200, 100, 50, delta=1e-5) == 0.0


def test_best_of_guess_counts_pays_for_the_sweep():
    rng = np.random.default_rng(7)
    member = rng.random(200) < 0.5
    scores = member * 1.5 + rng.normal(size=200)
    grid = (20, 100, 200)
    best = best_of_guess_counts(scores, member, method="steinke", grid=grid, delta=1e-5)
    assert best.level == pytest.approx(0.05 / 3) and best.guesses in grid
    per_count = []
    for r in grid:
        g, c = one_run_guesses(scores, member, k_pos=r // 2, k_neg=r - r // 2)
        per_count.append(epsilon_lower_bound_one_run(200, g, c, delta=1e-5, p_value=0.05 / 3))
        # each count at the corrected level is below the same count at the uncorrected one
        assert per_count[-1] <= epsilon_lower_bound_one_run(200, g, c, delta=1e-5, p_value=0.05)
    assert best.eps_lower_bound == pytest.approx(max(per_count))
    assert default_guess_grid(200) == (20, 40, 60, 80, 100, 120, 140, 160, 180, 200)
    with pytest.raises(ValueError):
        best_of_guess_counts(scores, member, grid=(0, 10))


def _gaussian_audit(rng, n, r, mu, *, paper_guesses: bool):
    """One simulated one-run audit of a mu-GDP mechanism: n fair-coin canaries, scores N(mu * bit, 1), r guesses.

    ``paper_guesses``: the optimal decoder's r most confident guesses (|x - mu/2|), as Xiang et al. simulate; else the
    suite's rule (top r/2 guessed in, bottom r/2 out). Returns the number of mistakes.
    """
    bits = rng.random(n) < 0.5
    x = rng.normal(size=n) + mu * bits
    if paper_guesses:
        chosen = np.argsort(-np.abs(x - mu / 2), kind="stable")[:r]
        return int(np.count_nonzero((x[chosen] > mu / 2) != bits[chosen]))
    g, c = one_run_guesses(x, bits, k_pos=r // 2, k_neg=r - r // 2)
    return g - c


@pytest.mark.parametrize("paper_guesses", [True, False])
def test_bounds_are_sound_on_a_simulated_gaussian_mechanism(paper_guesses):
    # the bound exceeds the true eps (4.377 for mu = 1 at delta = 1e-5) exactly when the true null is rejected, which
    # a 95% bound may do in at most 5% of audits: 500 audits, Binomial(500, 0.05) stays below 41 with 99.9% probability
    rng = np.random.default_rng(2025)
    n, r, mu, delta = 1000, 100, 1.0, 1e-5
    true_eps = GaussianChannel(mu).epsilon(delta)
    mistakes = [_gaussian_audit(rng, n, r, mu, paper_guesses=paper_guesses) for _ in range(500)]
    tight = sum(mistakes_tail_one_run(GaussianChannel(mu), u, r, n) < 0.05 for u in mistakes)
    steinke = sum(one_run_p_value(n, r, r - u, true_eps, delta) < 0.05 for u in mistakes)
    assert tight <= 40 and steinke <= 40
    # and not vacuous: the typical audit recovers most of the true eps (compare/RESULTS.txt: 3.16 of 4.38)
    median_u = int(np.median(mistakes))
    assert epsilon_lower_bound_tight(n, r, r - median_u, delta=delta, tolerance=1e-5) > (2.5 if paper_guesses else 1.0)
