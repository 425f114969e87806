"""The disclosure rule as pure logic (:mod:`audit.metrics.disclosure`): which numbers a shared report may hold.

The attacks that enforce it on a real audit are in ``tests/test_disclosure_attacks.py``.
"""

from __future__ import annotations

import math

import pytest
from helpers import make_report, synthetic_scores

from audit.core.schema import MetricEntry
from audit.metrics.disclosure import (
    gain_band,
    is_checkable,
    min_group,
    redact_report,
    shareable_metrics,
)

DIGITS_BITS = math.log2(10**6)


def test_the_minimum_group_makes_a_meet_in_the_middle_over_it_cost_2_to_the_64():
    k = min_group(DIGITS_BITS)
    assert k == 7
    assert k * DIGITS_BITS / 2 >= 64 > (k - 1) * DIGITS_BITS / 2
    assert min_group(128.0) == 2 and min_group(0.0) == 2  # never a single secret
    assert min_group(8.0) == 16


@pytest.mark.parametrize(("key", "checkable"), [
    ("information.bits/rep_16/base", True),
    ("exposure.null_mean/base", True),
    ("works.bits/synthetic/member/base", True),
    ("information.memorized_bits/rep_16", True),
    ("persistence.retained_bits/rep_4", True),
    ("information.bits/rep_16/tuned", False),
    ("exposure.mean/rep_16/tuned", False),
    ("mia.auc/loss_diff/rep_16", False),
    ("privacy.eps_lb", False),
])
def test_base_values_and_differences_to_base_are_the_checkers(key, checkable):
    assert is_checkable(key) is checkable


def test_gain_bands_split_at_their_edges():
    assert [gain_band(b) for b in (-3.0, 0.49, 0.5, 1.99, 2.0, 5.9, 6.0, 40.0)] == \
        ["none", "none", "small", "small", "large", "large", "very large", "very large"]


def test_a_checker_goes_only_over_a_large_enough_group():
    metrics = {"information.bits/rep_1/base": MetricEntry(value=53.1, n=2),
               "information.bits/rep_4/base": MetricEntry(value=52.0, n=8),
               "information.bits/rep_1/tuned": MetricEntry(value=50.0, n=2),
               "information.memorized_bits/rep_1": MetricEntry(value=3.1, n=2),
               "exposure.space_mean/rep_0/base": MetricEntry(value=1.2, n=None)}
    kept, withheld = shareable_metrics(metrics, space_bits=DIGITS_BITS)
    assert sorted(kept) == ["information.bits/rep_1/tuned", "information.bits/rep_4/base"]
    assert withheld == ["exposure.space_mean/rep_0/base", "information.bits/rep_1/base", "information.memorized_bits/rep_1"]


def test_a_redacted_report_holds_no_base_number_of_a_small_tier_anywhere():
    report = make_report(synthetic_scores(per_tier={0: 6, 1: 2, 4: 8, 16: 2}))
    shared = redact_report(report)
    assert shared.disclosure is not None and shared.disclosure.min_group == min_group(report.space_bits)
    small = {0, 1, 16}
    for key in shared.metrics:
        tier = next((p for p in key.split("/") if p.startswith("rep_")), None)
        if is_checkable(key) and tier is not None:
            assert int(tier.removeprefix("rep_")) not in small, key
    assert any(k.startswith("information.bits/rep_4/base") for k in shared.metrics)  # the large tier keeps its numbers
    for tier in shared.tiers:
        assert ("base" in tier.exposure_mean) is (tier.repetitions not in small)
        assert ("base" in tier.extracted) is (tier.repetitions not in small)
    assert "exposure.mean/rep_16/base" in shared.disclosure.withheld
    assert "information.memorized_bits/rep_16" in shared.disclosure.withheld
    assert redact_report(shared) == shared  # idempotent: old reports are redacted as they are read


def test_the_tier_table_says_withheld_instead_of_a_number():
    from audit.report import format_table

    table = format_table(redact_report(make_report(synthetic_scores())))
    assert "withheld" in table.splitlines()[2]  # the references' row
    assert "base-model numbers of groups under 7 secrets" in table
