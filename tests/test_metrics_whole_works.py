"""Whole-work metrics (audit.metrics.whole_works) on hand-made vectors: windows, (n, p) thresholds, token cover and
runs, code length with the longest context, stored bits, the bootstrap over works."""

from __future__ import annotations

import lzma
import math

import numpy as np
import pytest

from audit.metrics.extraction import is_np_extractable
from audit.metrics.whole_works import (
    MORRIS_BITS_PER_PARAM,
    code_bits_per_window,
    code_length,
    context_owner,
    extraction_log_threshold,
    longest_run,
    mean_over_works,
    np_extractable,
    stored_bits,
    stored_bits_per_parameter,
    suffix_greedy,
    suffix_logp_z,
    token_cover,
    window_starts,
    work_extraction,
)


def test_windows_step_by_the_stride_and_cover_the_tail():
    assert window_starts(10, prefix=2, suffix=2, stride=2).tolist() == [0, 2, 4, 6]
    assert window_starts(11, prefix=2, suffix=2, stride=2).tolist() == [0, 2, 4, 6, 7]  # one more window ends at token 10
    assert window_starts(4, prefix=2, suffix=2, stride=1).tolist() == [0]
    assert window_starts(7, prefix=2, suffix=3, stride=1).tolist() == [0, 1, 2]


@pytest.mark.parametrize("n, kw, match", [
    (3, dict(prefix=2, suffix=2, stride=2), "shorter than one window of 4"),
    (10, dict(prefix=2, suffix=2, stride=0), "stride must lie in"),
    (10, dict(prefix=2, suffix=2, stride=3), "stride must lie in"),
    (10, dict(prefix=0, suffix=2, stride=1), "at least 1 token"),
])
def test_windows_refuse_short_works_and_strides_that_skip_tokens(n, kw, match):
    with pytest.raises(ValueError, match=match):
        window_starts(n, **kw)


def test_the_log_threshold_agrees_with_the_probability_form():
    n, p = 100, 0.5
    threshold = extraction_log_threshold(n=n, p=p)
    assert math.exp(threshold) == pytest.approx(1 - 0.5 ** (1 / 100), rel=1e-12)  # 0.006908
    for pz in (1e-4, 6.8e-3, 6.95e-3, 0.2, 1.0):
        assert np_extractable([math.log(pz)], n=n, p=p)[0] == is_np_extractable(pz, n=n, p=p)
    assert not np_extractable([-800.0], n=10**9, p=0.01)[0]  # p_z = e^-800 underflows as a float: the log form does not
    assert extraction_log_threshold(n=1, p=0.5) == pytest.approx(math.log(0.5))


def test_suffix_probability_and_greedy_read_only_the_suffix_columns():
    # 2 windows of prefix 2 + suffix 2: columns score tokens 1, 2, 3; the suffix is tokens 2, 3 -> columns 1, 2
    lp = np.log([[0.1, 0.5, 0.5], [0.9, 0.1, 1.0]])
    assert np.exp(suffix_logp_z(lp, prefix=2)) == pytest.approx([0.25, 0.1])
    top1 = np.array([[False, True, True], [True, True, False]])
    assert suffix_greedy(top1, prefix=2).tolist() == [True, False]


def test_each_token_is_coded_by_the_window_with_the_longest_context():
    starts = window_starts(8, prefix=2, suffix=2, stride=2)  # [0, 2, 4]
    assert context_owner(starts, 8, width=4).tolist() == [-1, 0, 0, 0, 1, 1, 2, 2]
    # stride 1: token 5 is scored by windows 2 (context 3), 3 (context 2) and 4 (context 1): window 2 wins
    starts = window_starts(8, prefix=2, suffix=2, stride=1)
    assert context_owner(starts, 8, width=4).tolist() == [-1, 0, 0, 0, 1, 2, 3, 4]
    # window i scores token starts[i] + j + 1 in column j, with nats = i + (j + 1) / 10
    lp = -np.array([[i + (j + 1) / 10 for j in range(3)] for i in range(len(starts))])
    bits, tokens = code_bits_per_window(starts, lp, 8)
    assert tokens.tolist() == [3, 1, 1, 1, 1] and tokens.sum() == 7
    expected_nats = [0.1 + 0.2 + 0.3, 1 + 0.3, 2 + 0.3, 3 + 0.3, 4 + 0.3]
    assert bits == pytest.approx(np.array(expected_nats) / math.log(2))


def test_token_cover_runs_and_shares_of_one_work():
    starts = window_starts(12, prefix=2, suffix=2, stride=2)  # [0, 2, 4, 6, 8]; suffixes [2,4) [4,6) [6,8) [8,10) [10,12)
    flags = [False, True, True, False, True]
    any_cover, flagged = token_cover(starts, flags, prefix=2, suffix=2, n_tokens=12)
    assert any_cover.tolist() == [False] * 2 + [True] * 10
    assert flagged.astype(int).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1]
    assert longest_run(flagged) == 4 and longest_run([]) == 0 and longest_run([True, False, True]) == 1
    threshold = extraction_log_threshold(n=100, p=0.5)
    logp = [threshold - 1, threshold, threshold + 1, -50.0, -50.0]
    summary = work_extraction(starts, logp, flags, prefix=2, suffix=2, n_tokens=12, n=100, p=0.5)
    assert (summary.windows, summary.extractable_windows, summary.greedy_windows) == (5, 2, 3)
    assert summary.extractable_share == pytest.approx(0.4) and summary.greedy_share == pytest.approx(0.6)
    assert summary.extractable_token_share == pytest.approx(4 / 10) and summary.greedy_token_share == pytest.approx(6 / 10)
    assert summary.longest_greedy_run == 4 and summary.longest_extractable_run == 4


def test_overlapping_flagged_windows_stitch_into_one_run():
    starts = window_starts(9, prefix=2, suffix=3, stride=1)  # suffixes [2,5) [3,6) [4,7) [5,8) [6,9)
    _, flagged = token_cover(starts, [True, True, False, False, True], prefix=2, suffix=3, n_tokens=9)
    assert flagged.astype(int).tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1]
    assert longest_run(flagged) == 7


def test_code_length_against_raw_and_lzma():
    text = "abcabcabc" * 40
    c = code_length(720.0, 90, text)
    assert c.bytes == 360 and c.bits_per_byte == pytest.approx(2.0) and c.ratio_raw == pytest.approx(0.25)
    assert c.lzma_bits == 8 * len(lzma.compress(text.encode(), preset=9 | lzma.PRESET_EXTREME))
    assert c.ratio_lzma == pytest.approx(720.0 / c.lzma_bits)
    assert code_length(8.0, 1, "é").bits_per_byte == pytest.approx(4.0)  # 2 UTF-8 bytes
    with pytest.raises(ValueError, match="empty"):
        code_length(1.0, 1, "")


def test_stored_bits_and_the_capacity_yardstick():
    assert stored_bits(1200.0, 950.5) == pytest.approx(249.5)
    assert stored_bits(10.0, 12.0) == pytest.approx(-2.0)  # tuning can make a held-out work cost more
    assert stored_bits_per_parameter(3600.0, 1000) == pytest.approx(MORRIS_BITS_PER_PARAM)
    with pytest.raises(ValueError):
        stored_bits_per_parameter(1.0, 0)


def test_the_mean_over_works_carries_n_and_a_bootstrap_interval():
    one = mean_over_works([0.3])
    assert (one.value, one.n, one.low, one.high) == (0.3, 1, 0.3, 0.3)
    m = mean_over_works([0.0, 0.0, 1.0, 1.0], seed=3)
    assert m.value == 0.5 and m.n == 4 and 0.0 <= m.low < 0.5 < m.high <= 1.0
    same = mean_over_works([0.2, 0.2, 0.2])
    assert same.low == same.high == pytest.approx(0.2)
    assert mean_over_works([0.0, 0.0, 1.0, 1.0], seed=3) == m  # seeded
    with pytest.raises(ValueError):
        mean_over_works([])


def test_near_verbatim_blocks_merge_small_edits_and_drop_short_matches():
    from audit.metrics.whole_works import near_verbatim_blocks, nv_recall

    work = list(range(100, 200))  # 100 distinct tokens
    edited = work[10:30] + [7] + work[31:60]  # tokens 10..59 with one token changed at 30
    assert near_verbatim_blocks(edited, work, seed=4, max_gap=3, min_block=40) == [(10, 60)]
    assert near_verbatim_blocks(edited, work, seed=4, max_gap=0, min_block=40) == []  # a strict matcher splits it: 20 + 29
    assert near_verbatim_blocks(edited, work, seed=4, max_gap=0, min_block=20) == [(10, 30), (31, 60)]
    phrases = work[0:6] + [1, 2, 3] + work[50:56]  # short common phrases never count
    assert near_verbatim_blocks(phrases, work, seed=4, min_block=8) == []
    dropped = work[0:20] + work[22:50]  # two tokens dropped: the work gap is 2
    assert near_verbatim_blocks(dropped, work, seed=4, max_gap=3, min_block=40) == [(0, 50)]
    jump = work[0:25] + work[70:95]  # two real passages far apart: two blocks
    assert near_verbatim_blocks(jump, work, seed=4, max_gap=3, min_block=20) == [(0, 25), (70, 95)]
    assert nv_recall([(0, 25), (70, 95), (10, 30)], 100) == pytest.approx(0.55)
    assert near_verbatim_blocks([1, 2], work, seed=4) == []
