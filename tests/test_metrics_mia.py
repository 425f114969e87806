"""Membership-inference scores and their evaluation, on hand-made vectors."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.core.errors import AuditError
from audit.metrics import (
    InsufficientControlsError,
    difference_to_base,
    loss_score,
    min_k_plus_plus_score,
    min_k_score,
    ratio_to_base,
    roc_auc,
    tpr_at_fpr,
    zlib_ratio_score,
)
from audit.metrics.mia import ATTACK_SCOPES, ez_mia_score, mean_loss, ordering_agreement, zlib_bytes, zlib_mimir_score


def test_loss_and_base_calibrated_scores():
    assert loss_score([-1.0, -3.0]) == -2.0 and mean_loss([-1.0, -3.0]) == 2.0
    assert difference_to_base(mean_loss([-0.5, -0.5]), mean_loss([-2.0, -2.0])) == 1.5  # tuning took 1.5 nats off
    assert ratio_to_base(0.5, 2.0) == -0.25
    assert ratio_to_base(2.0, 2.0) == -1.0  # tuning changed nothing


def test_the_loss_ratio_has_no_score_where_the_base_loss_is_not_positive():
    assert ratio_to_base(0.5, 0.0) is None and ratio_to_base(0.0, 0.0) is None


def test_the_suite_scores_loss_diff_and_loss_ratio_through_these_functions():
    """attack_scores (what the mia.* metrics rank) gives these attacks exactly the values of the functions above."""
    from audit.core.schema import SequenceScore
    from audit.metrics.suite import attack_scores

    def row(model: str, loss: float) -> SequenceScore:
        return SequenceScore(canary_id="c", model=model, repetitions=1, secret_tokens=4, secret_nll_bits=8.0, rank=1,
                             n_references=15, exposure=4.0, extracted=False, mia_loss=loss)

    got = attack_scores(row("tuned", 0.75), row("base", 3.0))
    assert got["loss_diff"] == difference_to_base(0.75, 3.0) == 2.25 and got["loss_ratio"] == ratio_to_base(0.75, 3.0) == -0.25
    assert "loss_ratio" not in attack_scores(row("tuned", 0.75), row("base", 0.0)) and "loss_diff" in got


def test_min_k_takes_the_lowest_fraction():
    lp = [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert min_k_score(lp, k=0.2) == -5.0
    assert min_k_score(lp, k=0.4) == -4.5
    assert min_k_score(lp, k=0.1) == -5.0  # at least one token
    assert min_k_score(lp, k=1.0) == -3.0
    with pytest.raises(ValueError):
        min_k_score(lp, k=0.0)


def test_min_k_plus_plus_standardizes_by_the_vocabulary():
    # z = (lp - mu) / sigma = [(-1 + 2) / 2, (-3 + 2) / 1] = [0.5, -1]
    assert min_k_plus_plus_score([-1.0, -3.0], [-2.0, -2.0], [4.0, 1.0], k=0.5) == -1.0
    assert min_k_plus_plus_score([-1.0, -3.0], [-2.0, -2.0], [4.0, 1.0], k=1.0) == -0.25
    with pytest.raises(ValueError, match="shape"):
        min_k_plus_plus_score([-1.0], [-2.0, -2.0], [1.0, 1.0])


def test_zlib_ratio():
    assert len(zlib.compress(b"abc")) == 11
    lp = [-8 * math.log(2), -8 * math.log(2)]  # 16 bits
    assert zlib_ratio_score(lp, "abc") == pytest.approx(-16 / 88)


def test_roc_auc_by_hand():
    assert roc_auc([3, 4], [1, 2]) == 1.0
    assert roc_auc([1, 2], [3, 4]) == 0.0
    assert roc_auc([1], [1]) == 0.5
    assert roc_auc([0.9, 0.8, 0.5], [0.7, 0.5, 0.1]) == pytest.approx(7.5 / 9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=12), st.lists(st.integers(0, 5), min_size=1, max_size=12))
def test_roc_auc_matches_sklearn(members, controls):
    metrics = pytest.importorskip("sklearn.metrics")
    y = [1] * len(members) + [0] * len(controls)
    assert roc_auc(members, controls) == pytest.approx(metrics.roc_auc_score(y, members + controls))


CONTROLS = np.arange(100, dtype=float)  # 0..99


def test_tpr_at_fpr_inclusive():
    r = tpr_at_fpr([99.5, 98.5, 50.0], CONTROLS, 0.01)
    assert r.allowed_false_positives == 1
    assert r.threshold == 98.0  # the 2nd largest control: members must beat it
    assert r.tpr == pytest.approx(2 / 3)
    assert r.achieved_fpr == 0.01
    assert r.low < 2 / 3 < r.high
    assert (r.n_members, r.n_controls, r.convention) == (3, 100, "inclusive")


def test_tie_with_the_threshold_is_a_miss():
    assert tpr_at_fpr([98.0, 99.0], CONTROLS, 0.01).tpr == 0.5


def test_strict_convention_needs_more_controls():
    with pytest.raises(InsufficientControlsError, match="101 controls"):
        tpr_at_fpr([1.0], CONTROLS, 0.01, convention="strict")
    r = tpr_at_fpr([99.5, 97.5], np.arange(101, dtype=float), 0.01, convention="strict")
    assert r.allowed_false_positives == 1  # ceil(1.01) - 1
    assert r.achieved_fpr < 0.01


def test_too_few_controls_is_refused_with_a_fix():
    with pytest.raises(InsufficientControlsError) as err:
        tpr_at_fpr([1.0, 2.0], CONTROLS[:99], 0.01)
    assert isinstance(err.value, AuditError)
    assert "at least 100 controls" in str(err.value) and "got 99" in str(err.value) and "fix:" in str(err.value)
    with pytest.raises(InsufficientControlsError, match="1000 controls"):
        tpr_at_fpr([1.0], CONTROLS, 0.001)


def test_large_fpr_allows_every_control():
    r = tpr_at_fpr([0.0], [1.0, 2.0], 0.99)
    assert r.tpr == 0.0 and r.allowed_false_positives == 1


# ------------------------------------------------------------------------------- EZ-MIA, mimir's zlib, scopes


def reference_ez_ratio(target, reference, top1, *, min_tokens: int = 2) -> float:
    """The reference code's score (``error_zone_pos_neg_sum_ratio`` then ``np.nan_to_num``): P / N in the zone, 0 when
    the zone has fewer than ``min_tokens`` positions or no negative shift. The oracle for the paper's setting."""
    zone = (np.asarray(target, dtype=float) - np.asarray(reference, dtype=float))[~np.asarray(top1, dtype=bool)]
    down = -zone[zone < 0].sum()
    return 0.0 if zone.size < min_tokens or down == 0 else zone[zone > 0].sum() / down


def test_ez_mia_is_the_sign_balance_of_the_shifts_in_the_error_zone():
    target = [-1.0, -2.0, -0.5, -3.0]
    reference = [-2.0, -1.5, -0.1, -4.0]
    top1 = [False, False, True, False]  # position 2 is predicted right: outside the error zone, whatever its shift
    # error zone 0, 1, 3: shifts +1.0, -0.5, +1.0 -> P = 2.0 up, N = 0.5 down: (2 - 0.5) / (2 + 0.5); the paper's r = 4
    assert ez_mia_score(target, reference, top1) == pytest.approx(0.6) == (4.0 - 1) / (4.0 + 1)
    # the same shifts on a correctly predicted position do not count: -0.5, +1.0
    assert ez_mia_score(target, reference, [True, False, True, False]) == pytest.approx(0.5 / 1.5)
    with pytest.raises(ValueError, match="one shape"):
        ez_mia_score([-1.0, -1.0], [-2.0], [False, False])


def test_ez_mia_orders_long_natural_texts_as_the_paper_does():
    """The paper's setting: 128-token texts whose error zone always holds shifts of both signs. There the score is a
    strictly increasing map of the paper's ratio, so every pair of texts, the AUC and the TPR at low FPR are the same."""
    rng = np.random.default_rng(7)
    n, length = 400, 128
    member = rng.random(n) < 0.5
    reference = rng.normal(-3.0, 1.0, size=(n, length))
    shift = rng.normal(0.0, 0.5, size=(n, length)) + np.where(member, 0.08, 0.0)[:, None]  # members: slightly raised
    top1 = rng.random((n, length)) < 0.4
    ours = np.array([ez_mia_score(r + d, r, t) for r, d, t in zip(reference, shift, top1, strict=True)])
    paper = np.array([reference_ez_ratio(r + d, r, t) for r, d, t in zip(reference, shift, top1, strict=True)])
    assert all(((d[~t] > 0).any() and (d[~t] < 0).any()) for d, t in zip(shift, top1, strict=True))  # both signs
    assert ordering_agreement(ours, paper) == 1.0
    assert roc_auc(ours[member], ours[~member]) == roc_auc(paper[member], paper[~member]) > 0.6
    assert (tpr_at_fpr(ours[member], ours[~member], 0.01).tpr == tpr_at_fpr(paper[member], paper[~member], 0.01).tpr)
    np.testing.assert_allclose(ours, (paper - 1) / (paper + 1))


def test_an_all_positive_error_zone_is_the_strongest_member_signal():
    reference = np.array([-3.0, -2.0, -4.0, -1.0, -2.5])
    top1 = np.array([True, False, False, True, False])
    memorized = reference + [0.0, 0.2, 1.5, 0.0, 0.1]  # every token it still gets wrong was raised
    mixed = reference + [0.0, 3.0, 3.0, 0.0, -0.01]  # far larger gains, but one wrong token fell
    assert ez_mia_score(memorized, reference, top1) == 1.0 > ez_mia_score(mixed, reference, top1) > 0.99
    # the reference code scores the memorized one 0, below a text tuning lowered almost everywhere
    lowered = reference + [0.0, -1.0, -1.0, 0.0, 0.01]
    assert reference_ez_ratio(memorized, reference, top1) == 0.0 < reference_ez_ratio(lowered, reference, top1)
    assert ez_mia_score(lowered, reference, top1) < 0 < ez_mia_score(memorized, reference, top1)
    assert ez_mia_score(reference - 0.5, reference, top1) == -1.0  # all-negative: the bottom, as in the paper


def test_verbatim_recall_is_scored_by_the_whole_texts_balance_never_as_evidence_against():
    reference = np.array([-6.0, -5.0, -7.0, -4.0])
    right = np.ones(4, dtype=bool)
    # only the tuned model recalls it: tuning raised every token, the top score (the reference code: 0, the bottom)
    assert ez_mia_score(reference + [5.0, 4.0, 6.0, 3.5], reference, right) == 1.0
    assert reference_ez_ratio(reference + [5.0, 4.0, 6.0, 3.5], reference, right) == 0.0
    # the base recalled it too and tuning moved it both ways a little: near neutral, not the bottom
    assert ez_mia_score(reference + [0.01, -0.01, 0.02, -0.02], reference, right) == pytest.approx(0.0)
    # one wrong token is fewer than min_tokens: the whole text weighs in, that token included
    one_wrong = [False, True, True, True]
    assert ez_mia_score(reference + [-0.5, 1.0, 1.0, 0.5], reference, one_wrong) == pytest.approx(2.0 / 3.0)
    assert ez_mia_score(reference + [-0.5, 1.0, 1.0, 0.5], reference, one_wrong, min_tokens=1) == -1.0
    assert ez_mia_score(reference, reference, right) == 0.0 and ez_mia_score([], [], []) == 0.0  # nothing moved


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.booleans()), min_size=1, max_size=12), st.data())
def test_ez_mia_is_monotone_in_every_shift(tokens, data):
    """Raising the tuned model's log-prob of any token (its top-1 flag unchanged) never lowers the score."""
    shift = np.array([d for d, _ in tokens])
    top1 = np.array([t for _, t in tokens])
    at = data.draw(st.integers(0, len(tokens) - 1))
    more = shift.copy()
    more[at] += data.draw(st.floats(0.001, 5))
    reference = np.full(len(tokens), -4.0)
    before, after = ez_mia_score(reference + shift, reference, top1), ez_mia_score(reference + more, reference, top1)
    assert -1.0 <= before <= after + 1e-12 <= 1.0 + 1e-12


def test_ez_mia_is_scale_free():
    reference = np.array([-3.0, -2.0, -4.0, -1.0])
    top1 = np.zeros(4, dtype=bool)
    base = ez_mia_score(reference + [0.5, -0.5, 0.5, -0.5], reference, top1)
    more = ez_mia_score(reference + [1.5, -0.5, 0.5, -0.5], reference, top1)
    assert base == pytest.approx(0.0) and more == pytest.approx(1.0 / 3.0)
    assert ez_mia_score(reference + 3 * np.array([1.5, -0.5, 0.5, -0.5]), reference, top1) == pytest.approx(more)


def test_mimir_zlib_is_mean_loss_over_compressed_bytes():
    text = "The access code is 482913."
    assert zlib_bytes(text) == len(zlib.compress(text.encode("utf-8")))
    assert zlib_mimir_score([-1.0, -3.0], 20) == pytest.approx(-2.0 / 20)
    with pytest.raises(ValueError):
        zlib_mimir_score([-1.0], 0)


def test_fixed_length_digits_make_secret_zlib_a_reordering_of_loss():
    # 6-digit secrets compress to nearly the same length, so bits / zlib bits orders them as the loss does
    rng = np.random.default_rng(3)
    secrets = [f"{x:06d}" for x in rng.integers(0, 10**6, size=300)]
    lengths = {len(zlib.compress(s.encode())) for s in secrets}
    logprobs = rng.normal(-2.0, 0.7, size=(300, 6))
    loss = [loss_score(lp) for lp in logprobs]
    zl = [zlib_ratio_score(lp, s) for lp, s in zip(logprobs, secrets, strict=True)]
    assert len(lengths) <= 2 and ordering_agreement(zl, loss) >= 0.99
    # whole texts of different lengths do not: their zlib length carries information of its own
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
    texts = ["".join(rng.choice(letters, size=int(n))) for n in rng.integers(10, 300, size=300)]
    zt = [zlib_mimir_score(lp, zlib_bytes(t)) for lp, t in zip(logprobs, texts, strict=True)]
    assert ordering_agreement(zt, loss) < 0.9
    assert ordering_agreement([1, 2, 3], [3, 2, 1]) == 0.0 and ordering_agreement([1, 2, 3], [10, 20, 30]) == 1.0


def test_every_attack_names_its_scope_and_its_papers():
    for attack, (scope, paper_scope, paper) in ATTACK_SCOPES.items():
        assert scope in ("secret", "text") and paper_scope in ("secret", "text") and paper
        assert not attack.endswith("_text") or scope == "text"
        assert not attack.endswith("_secret") or scope == "secret"
    # mimir's zlib and EZ-MIA score whole texts; memaudit's calibrated Min-K%++ the secret span
    assert ATTACK_SCOPES["zlib"][1] == "text" and ATTACK_SCOPES["ez_mia"][0] == "text"
    assert ATTACK_SCOPES["min_k_pp_diff"][:2] == ("secret", "secret")
