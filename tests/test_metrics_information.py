"""The information view: bits, memorized bits, compression against raw UTF-8."""

from __future__ import annotations

import math

import pytest

from audit.metrics import bits, compression_ratio, information_view, utf8_bits


def test_bits_and_ratio():
    assert bits([-math.log(2), -2 * math.log(2)]) == pytest.approx(3.0)
    assert utf8_bits("é") == 16
    assert compression_ratio(8.0, "a") == 1.0
    with pytest.raises(ValueError):
        compression_ratio(1.0, "")


def test_information_view():
    view = information_view([-4 * math.log(2)] * 2, [-0.5 * math.log(2)] * 2, "ab")
    assert (view.bits_base, view.bits_tuned) == (pytest.approx(8.0), pytest.approx(1.0))
    assert view.memorized_bits == pytest.approx(7.0)
    assert view.raw_bits == 16
    assert (view.compression_base, view.compression_tuned) == (pytest.approx(0.5), pytest.approx(1 / 16))
