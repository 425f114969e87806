"""Extraction metrics on hand-made vectors (Carlini et al. 2023; Hayes et al. 2025)."""

from __future__ import annotations

import math

import pytest

from audit.metrics import discoverable_match, extraction_probability, is_np_extractable, queries_needed
from audit.metrics.extraction import edit_distance, longest_common_prefix, normalized_edit_distance


def test_prefix_and_edit_distance():
    assert longest_common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert longest_common_prefix([], [1]) == 0
    assert edit_distance(list("kitten"), list("sitting")) == 3
    assert normalized_edit_distance([1, 2, 3, 9, 9], [1, 2, 4]) == pytest.approx(1 / 3)  # only |target| tokens compared
    assert normalized_edit_distance([], [1, 2]) == 1.0


def test_discoverable_match():
    m = discoverable_match([5, 6, 7, 0], [5, 6, 7])
    assert (m.exact, m.lcp_tokens, m.normalized_edit_distance) == (True, 3, 0.0)
    m = discoverable_match([5, 7, 6], [5, 6, 7])
    assert (m.exact, m.lcp_tokens, m.normalized_edit_distance) == (False, 1, pytest.approx(2 / 3))


def test_probabilistic_extraction():
    assert extraction_probability(0.5, 2) == pytest.approx(0.75)
    assert extraction_probability(0.0, 10**6) == 0.0
    assert extraction_probability(1e-12, 10**6) == pytest.approx(1e-6, rel=1e-5)  # stable for tiny p_z
    assert queries_needed(0.5, 0.75) == 2
    assert queries_needed(0.1, 0.5) == math.ceil(math.log(0.5) / math.log(0.9)) == 7
    assert queries_needed(0.0, 0.5) == math.inf
    assert is_np_extractable(0.1, n=7, p=0.5) and not is_np_extractable(0.1, n=6, p=0.5)
