"""Exposure against hand-made vectors, including tensorflow/privacy's ``secret_sharer/exposures_test.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from audit.metrics import (
    exposure_extrapolation,
    exposure_from_rank,
    exposure_interpolation,
    null_exposure_mean,
    rank_against_references,
    sampled_space_exposure,
)
from audit.metrics.exposure import null_calibration, null_exposure_variance

TF_REFS = np.arange(1, 17, dtype=float)  # references 1..16
TF_SECRETS = {"1": [0.0, 0.1], "2": [20.0], "5": [3.5], "8": [3.5]}


def test_tf_privacy_interpolation_vector():
    # tensorflow/privacy exposures_test.py::test_exposure_interpolation: |R| = number of references (16)
    got = exposure_interpolation(TF_SECRETS, TF_REFS, convention="tf_privacy")
    np.testing.assert_allclose(got["1"], [4.0, 4.0])
    np.testing.assert_allclose(got["2"], [4.0 - math.log2(17)])  # -0.0874628: below 0 in this convention
    np.testing.assert_allclose(got["2"], [-0.0874628], atol=1e-7)
    np.testing.assert_allclose(got["5"], [2.0])
    np.testing.assert_allclose(got["8"], [2.0])


def test_paper_convention_counts_the_canary_in_the_space():
    got = exposure_interpolation(TF_SECRETS, TF_REFS)  # |R| = 17: canary + 16 references
    top = math.log2(17)
    np.testing.assert_allclose(got["1"], [top, top])
    np.testing.assert_allclose(got["2"], [0.0], atol=1e-12)  # last of 17: exposure 0, never negative
    np.testing.assert_allclose(got["5"], [top - 2.0])


def test_ties_count_against_the_canary():
    # a reference with exactly the canary's loss ranks ahead of it (rank 1 + #refs <= loss)
    assert rank_against_references(3.0, [1.0, 3.0, 5.0]) == 3
    np.testing.assert_allclose(exposure_interpolation([3.0], [1.0, 3.0, 5.0]), [2.0 - math.log2(3)])
    assert exposure_interpolation(np.array([3.0]), [3.0, 3.0, 3.0], convention="tf_privacy")[0] == pytest.approx(math.log2(3) - 2)


def test_exposure_from_rank_bounds():
    assert exposure_from_rank(1, 1024) == 10.0
    assert exposure_from_rank(1024, 1024) == 0.0
    with pytest.raises(ValueError):
        exposure_from_rank(0, 10)
    with pytest.raises(ValueError):
        exposure_from_rank(11, 10)


def test_bad_convention_is_refused():
    with pytest.raises(ValueError, match="convention"):
        exposure_interpolation([1.0], [1.0], convention="mine")  # type: ignore[arg-type]


def test_tf_privacy_extrapolation_property_with_fixed_seed():
    # tensorflow/privacy exposures_test.py::test_exposure_extrapolation, with a seed (the original draws unseeded)
    rng = np.random.default_rng(7)
    refs = stats.skewnorm.rvs(4, 0, 1, size=10_000, random_state=rng)
    secrets = {"1": [-1.0, 0.0], "10": [0.5]}
    got = exposure_extrapolation(secrets, refs)
    params = stats.skewnorm.fit(refs)
    for key, values in secrets.items():
        np.testing.assert_allclose(got[key].exposure, -np.log2(stats.skewnorm.cdf(values, *params)), rtol=1e-9)
        assert not got[key].capped.any()


def test_extrapolation_is_capped_at_the_space_and_flagged():
    rng = np.random.default_rng(0)
    refs = stats.skewnorm.rvs(4, 10, 2, size=2_000, random_state=rng)
    raw = exposure_extrapolation([0.0, 9.5, 14.0], refs)
    capped = exposure_extrapolation([0.0, 9.5, 14.0], refs, space_size=10**6)
    assert raw.exposure[0] > 100  # the skew-normal left tail collapses: hundreds of bits
    assert capped.exposure[0] == pytest.approx(math.log2(10**6))
    assert capped.capped.tolist() == [True, raw.exposure[1] > math.log2(10**6), False]
    assert capped.exposure[2] == pytest.approx(raw.exposure[2])


def test_null_exposure_mean_matches_enumeration():
    for n in (1, 2, 7, 1000):
        by_hand = sum(math.log2(n) - math.log2(k) for k in range(1, n + 1)) / n
        assert null_exposure_mean(n) == pytest.approx(by_hand, abs=1e-9)
    assert null_exposure_mean(2) == pytest.approx(0.5)
    assert null_exposure_mean(10**9) == pytest.approx(1 / math.log(2), abs=1e-6)


def test_sampled_space_exposure_interval_by_hand():
    # rank 1 among 255 references from a 10^6 space: point estimate log2(10^6), and the exact 95% upper bound on the
    # fraction beating it is 1 - 0.025^(1/255)
    est = sampled_space_exposure(1, 255, 10**6)
    top = math.log2(10**6)
    f_hi = 1 - 0.025 ** (1 / 255)
    assert est.exposure == pytest.approx(top)
    assert est.high == pytest.approx(top)
    assert est.low == pytest.approx(top - math.log2(1 + f_hi * (10**6 - 1)), rel=1e-9)
    mid = sampled_space_exposure(129, 255, 10**6)  # about half beat it: about 1 bit
    assert mid.low < mid.exposure < mid.high
    assert mid.exposure == pytest.approx(top - math.log2(1 + 128 / 255 * (10**6 - 1)))
    with pytest.raises(ValueError):
        sampled_space_exposure(300, 255, 10**6)


def test_null_variance_matches_enumeration_and_the_exponential_limit():
    ranks = np.arange(1, 257)
    assert null_exposure_variance(256) == pytest.approx(float(np.var(8 - np.log2(ranks))), rel=1e-12)
    assert null_exposure_variance(10**6) == pytest.approx(1 / math.log(2) ** 2, rel=1e-3)


def test_null_calibration_by_hand():
    # four references ranked 1, 64, 128, 256 of N = 256: exposures 8, 2, 1, 0
    cal = null_calibration([8.0, 2.0, 1.0, 0.0], 256)
    assert cal.mean == pytest.approx(2.75) and cal.n == 4 and cal.expected == pytest.approx(null_exposure_mean(256))
    sd = np.std([8.0, 2.0, 1.0, 0.0], ddof=1)
    half = stats.t.ppf(0.975, 3) * sd / 2
    assert (cal.low, cal.high) == (pytest.approx(2.75 - half), pytest.approx(2.75 + half))
    z = (2.75 - cal.expected) / math.sqrt(null_exposure_variance(256) / 4)
    assert cal.p_value == pytest.approx(2 * stats.norm.sf(z)) and not cal.biased
    with pytest.raises(ValueError):
        null_calibration([1.0], 256)


def test_null_calibration_false_alarms_stay_under_one_percent():
    # 2000 simulated audits of 100 unlearned references (uniform ranks among 256): flagged at most ~1% of the time
    rng = np.random.default_rng(11)
    flags = [null_calibration(8 - np.log2(rng.integers(1, 257, size=100)), 256).biased for _ in range(2000)]
    assert np.mean(flags) <= 0.015


def test_a_prefix_the_model_already_completes_is_flagged():
    # references ranked in the top 10% (a template that gives the secret away): mean exposure ~ 4.3 bits
    rng = np.random.default_rng(5)
    cal = null_calibration(8 - np.log2(rng.integers(1, 26, size=100)), 256)
    assert cal.biased and cal.p_value < 1e-6 and cal.low > cal.expected
