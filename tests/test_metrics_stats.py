"""Clopper-Pearson intervals against closed forms and a published value."""

from __future__ import annotations

import pytest

from audit.metrics import clopper_pearson


def test_closed_forms_at_the_edges():
    zero = clopper_pearson(0, 20)
    assert (zero.low, zero.rate) == (0.0, 0.0)
    assert zero.high == pytest.approx(1 - 0.025 ** (1 / 20))
    full = clopper_pearson(20, 20)
    assert full.high == 1.0
    assert full.low == pytest.approx(0.025 ** (1 / 20))


def test_five_of_ten():
    p = clopper_pearson(5, 10)
    assert p.rate == 0.5
    assert (p.low, p.high) == pytest.approx((0.187086, 0.812914), abs=1e-6)


def test_bad_input():
    with pytest.raises(ValueError):
        clopper_pearson(3, 2)
    with pytest.raises(ValueError):
        clopper_pearson(1, 2, confidence=1.0)
    assert clopper_pearson(0, 0).high == 1.0
