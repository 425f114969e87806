"""Steinke, Nasr, Jagielski 2023 one-run epsilon lower bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from audit.metrics import epsilon_ceiling_one_run, epsilon_lower_bound_one_run, one_run_audit, one_run_p_value
from audit.metrics.privacy import one_run_guesses


def _p_value_vectorized(m, r, v, eps, delta):
    """The Appendix-D p-value written independently: cumulative sums instead of the paper's loop."""
    q = 1 / (1 + math.exp(-eps))
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[Bin = v-1], P[Bin = v-2], ..., P[Bin = 0]
    worst = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1))) if v else 0.0
    return min(1.0, float(stats.binom.sf(v - 1, r, q)) + 2 * m * delta * worst)


def test_closed_form_ceiling_without_delta():
    # all r guesses right, delta = 0: p(eps) = q^r, so eps_LB = logit(p^(1/r)); 3.4930 for r = 100 at p = 0.05
    q = 0.05 ** (1 / 100)
    assert epsilon_lower_bound_one_run(1000, 100, 100) == pytest.approx(math.log(q / (1 - q)), abs=1e-7)
    assert epsilon_ceiling_one_run(1000, 100) == pytest.approx(3.4930, abs=5e-5)


@pytest.mark.parametrize(("m", "r", "v", "eps", "delta"),
                         [(1000, 100, 90, 1.5, 1e-5), (500, 50, 40, 0.7, 1e-3), (200, 20, 20, 2.0, 0.0), (100, 10, 3, 0.1, 1e-2)])
def test_p_value_matches_an_independent_implementation(m, r, v, eps, delta):
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(_p_value_vectorized(m, r, v, eps, delta), rel=1e-12)


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
