"""The metric suite on hand-made per-canary rows: keys, values, refusals, privacy bound."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from helpers import PREFIX, score_row, token_row, token_scores

from audit.core.schema import SequenceScore
from audit.metrics import epsilon_ceiling_one_run, epsilon_lower_bound_one_run
from audit.metrics.mia import zlib_bytes
from audit.metrics.suite import attack_scores, summarize_metrics, token_view_fields


def scores(n_refs: int = 3):
    out = []
    for k, drop in enumerate([3.0, 2.5, 2.0]):  # members: fine-tuning lowered their loss a lot
        out += [score_row(f"m{k}", "base", 4, loss=4.0, bits=20.0),
                score_row(f"m{k}", "tuned", 4, loss=4.0 - drop, bits=1.0 + k, mkpp=1.0, extracted=k == 0,
                          sampled=2 if k == 0 else 0)]
    for k in range(n_refs):  # references: barely moved
        out += [score_row(f"r{k}", "base", 0, loss=4.0, bits=20.0),
                score_row(f"r{k}", "tuned", 0, loss=3.9 + 0.01 * k, bits=19.5)]
    return out


def test_attack_scores_orientation():
    tuned, base = score_row("a", "tuned", 4, loss=1.0, bits=1, mkpp=2.0), score_row("a", "base", 4, loss=4.0, bits=1, mkpp=0.5)
    got = attack_scores(tuned, base)
    assert got["loss"] == -1.0 and got["loss_diff"] == 3.0 and got["loss_ratio"] == -0.25 and got["min_k_pp_diff"] == 1.5
    assert "loss_diff" not in attack_scores(tuned, None)


def test_suite_keys_and_values():
    out = summarize_metrics(scores(), privacy_delta=0.0)
    m = out.metrics
    assert m["mia.auc/loss_diff"].value == 1.0 and m["mia.auc/loss_diff"].n == 6
    assert m["mia.auc/loss_diff/rep_4"].value == 1.0
    assert m["information.memorized_bits/rep_4"].value == pytest.approx(20 - 2.0)
    assert m["information.bits/rep_0/tuned"].value == 19.5
    assert m["information.compression/rep_0/base"].value == pytest.approx(20 / 48, abs=1e-6)
    assert m["extraction.from_fraction/rep_4/tuned"].value == 1.0
    assert m["extraction.sampled_any/rep_4/tuned"].value == 1.0
    rate = m["extraction.sampled_rate/rep_4/tuned"]  # 2 of 3 x 4 samples, Clopper-Pearson interval
    assert (rate.value, rate.n) == (pytest.approx(2 / 12, abs=1e-6), 12) and rate.low < 2 / 12 < rate.high
    # p_z = 2^-1, 2^-2, 2^-3: all (100, 0.5)-extractable; references at 2^-19.5 are not
    assert m["extraction.np_extractable/rep_4/tuned"].value == 3.0
    assert m["extraction.np_extractable/rep_0/tuned"].value == 0.0
    assert m["exposure.exact_share/rep_4/tuned"].value == 0.0
    assert m["extraction.lcp_mean/rep_4/tuned"].value == 2.0
    # TPR at 1% FPR with 3 controls is refused, and the note says why
    assert "mia.tpr_at_1pct/loss_diff" not in m
    assert out.notes["mia.tpr_at_1pct"] == "refused: 3 controls, needs >= 100 (inclusive FPR convention)"
    # one-run DP audit on all 6 canaries, perfect separation: 6/6 right, the bound equals its ceiling
    assert m["privacy.guesses"].value == 6 and m["privacy.correct"].value == 6
    assert m["privacy.eps_lb"].value == pytest.approx(epsilon_lower_bound_one_run(6, 6, 6), abs=1e-6)
    assert m["privacy.eps_ceiling"].value == pytest.approx(epsilon_ceiling_one_run(6, 6), abs=1e-6)
    assert math.isfinite(m["privacy.eps_lb"].value)


def test_tpr_is_measured_with_enough_controls():
    out = summarize_metrics(scores(n_refs=100))
    tpr = out.metrics["mia.tpr_at_1pct/loss_diff"]
    assert tpr.value == 1.0 and tpr.n == 3 and tpr.low < 1.0 == tpr.high
    assert "mia.tpr_at_0.1pct/loss_diff" not in out.metrics
    assert out.notes["mia.tpr_at_1pct"].startswith("inclusive FPR convention")


def test_without_base_only_single_model_attacks():
    tuned_only = [s for s in scores() if s.model == "tuned"]
    out = summarize_metrics(tuned_only)
    assert "mia.auc/loss" in out.metrics and "mia.auc/loss_diff" not in out.metrics
    assert "information.memorized_bits/rep_4" not in out.metrics
    assert "privacy.eps_lb" in out.metrics  # falls back to the loss attack


# ------------------------------------------------- per-token view: text-scope attacks, EZ-MIA, tiers, null, bounds


def test_ez_mia_reads_the_whole_text_without_its_first_position():
    base = token_row("a", "base", 4, [-3.0] * 6)
    tuned = token_row("a", "tuned", 4, [-2.0, -4.0, -2.0, -3.5, -3.0, -3.0], top1=[True] + [False] * 9)
    got = attack_scores(tuned, base)
    # secret shifts +1, -1, +1, -0.5, 0, 0 in the error zone (the prefix did not move): 2 up, 1.5 down, (2 - 1.5) / 3.5
    assert got["ez_mia"] == pytest.approx(0.5 / 3.5) and got["ez_mia_secret"] == pytest.approx(0.5 / 3.5)
    assert got["loss_text"] == pytest.approx(np.mean(PREFIX + [-2.0, -4.0, -2.0, -3.5, -3.0, -3.0]))
    assert got["loss_diff_text"] == pytest.approx(got["loss_text"] - np.mean(PREFIX + [-3.0] * 6))
    assert got["zlib_text"] == pytest.approx(got["loss_text"] / 31)
    assert "ez_mia" not in attack_scores(tuned, None) and "loss_text" in attack_scores(tuned, None)


def test_per_token_view_adds_keys_and_changes_none_of_the_old_ones():
    rows = token_scores()
    stripped = [r.model_copy(update=dict(token_logprobs=None, token_top1=None, token_vocab_mean=None,
                                         token_vocab_var=None, secret_token_offset=None, text_zlib_bytes=None))
                for r in rows]
    full, old = summarize_metrics(rows).metrics, summarize_metrics(stripped).metrics
    assert all(full[k] == v for k, v in old.items())
    added = set(full) - set(old)
    for attack in ("ez_mia", "ez_mia_secret", "loss_text", "zlib_text", "min_k_text", "min_k_pp_text", "loss_diff_text",
                   "min_k_pp_diff_text"):
        assert f"mia.auc/{attack}" in added
    assert full["mia.auc/loss_diff_text"].value > 0.9 and full["mia.auc/loss_diff_text"].n == 108


def test_scope_notes_and_the_degenerate_zlib_flag():
    out = summarize_metrics(token_scores())
    assert out.notes["mia.scope/zlib"].startswith("secret tokens;") and "see zlib_text" in out.notes["mia.scope/zlib"]
    assert out.notes["mia.scope/ez_mia"].startswith("text tokens;")
    # the helper's zlib is loss / 10: the same ordering, flagged; the whole-text zlib differs in length and is not
    assert "degenerate for this spec" in out.notes["mia.degenerate/zlib"]
    assert "mia.degenerate/zlib_text" not in out.notes


def test_tpr_at_1pct_per_tier_for_the_calibrated_attacks():
    m = summarize_metrics(token_scores()).metrics
    for tier in (1, 4):
        tpr = m[f"mia.tpr_at_1pct/loss_diff/rep_{tier}"]
        assert tpr.n == 4 and tpr.low <= tpr.value <= tpr.high
    assert m["mia.tpr_at_1pct/loss_diff/rep_4"].value >= m["mia.tpr_at_1pct/loss_diff/rep_1"].value
    assert "mia.tpr_at_1pct/ez_mia/rep_4" in m and "mia.tpr_at_1pct/loss/rep_4" not in m
    assert "mia.tpr_at_1pct/loss_diff/rep_4" not in summarize_metrics(scores()).metrics  # 3 controls: refused


def test_null_calibration_of_the_references():
    out = summarize_metrics(token_scores())
    m = out.metrics
    assert m["exposure.null_mean/base"].n == 100 and m["exposure.null_biased/base"].value == 0.0
    null = m["exposure.null_mean/base"]
    assert null.low < null.value < null.high and m["exposure.null_p/base"].value >= 0.01
    assert "z-test p" in out.notes["exposure.null/tuned"]
    # the old helper's references all rank first among 256 (8 bits each): biased, and said so
    biased = summarize_metrics(scores(n_refs=10))
    assert biased.metrics["exposure.null_biased/tuned"].value == 1.0 and "BIASED" in biased.notes["exposure.null/tuned"]


def test_every_bound_method_on_the_same_guesses():
    out = summarize_metrics(token_scores(n_refs=20))
    m = out.metrics
    assert m["privacy.eps_lb/steinke"] == m["privacy.eps_lb"]
    assert m["privacy.eps_lb/xiang_gdp"].value >= m["privacy.eps_lb"].value
    assert m["privacy.eps_lb/xiang_eps_delta"].value >= m["privacy.eps_lb"].value - 1e-4
    for method in ("steinke", "xiang_gdp"):
        assert f"privacy.eps_lb/{method}_best_k" in m and "Bonferroni" in out.notes[f"privacy.eps_lb/{method}_best_k"]
    no_delta = summarize_metrics(token_scores(n_refs=20), privacy_delta=0.0)
    assert "privacy.eps_lb/xiang_gdp" not in no_delta.metrics and "delta = 0" in no_delta.notes["privacy.eps_lb/xiang_gdp"]


def test_per_token_values_are_kept_to_four_decimals_so_no_six_digit_run_appears():
    r = token_row("a", "tuned", 1, [-2.48291234, -13.123456789, -0.1000004, -1.0, -1.0, -1.0])
    assert r.token_logprobs[4:7] == [-2.4829, -13.1235, -0.1]
    assert not re.search(r"\d{6}", json.dumps({"lp": r.token_logprobs, "mu": r.token_vocab_mean, "var": r.token_vocab_var}))


def test_token_view_fields_are_what_the_engine_stores():
    text = "The code is 123456."
    fields = token_view_fields(np.array([-1.23456789, -2.0, -0.5]), np.array([True, False, False]), [-4.0] * 3, [2.0] * 3,
                               prefix_tokens=2, text=text)
    assert fields["secret_token_offset"] == 1 and fields["text_zlib_bytes"] == zlib_bytes(text)
    assert fields["token_top1"] == [True, False, False]
    r = SequenceScore.model_validate(score_row("a", "tuned", 1, loss=1.0, bits=1.0).model_dump() | fields)
    assert r.token_logprobs == [-1.2346, -2.0, -0.5] and "123456" not in r.model_dump_json()
    with pytest.raises(ValueError, match="3 scored tokens"):
        token_view_fields([-1.0, -2.0, -3.0], [True], None, None, prefix_tokens=1, text=text)


# ------------------------------------------------- an attack far below chance where another separates: flagged


def inverted_scores(*, per_tier: int = 8, n_refs: int = 20, seed: int = 0, drop_16x: float = 2.5) -> list[SequenceScore]:
    """Fine-tuning lowers the 16x members' loss by ``drop_16x`` (loss_diff separates them) while min_k_pp reads the
    opposite sign (tuning 'lowered' it by 2.5 for exactly those members); the 1x members barely moved, like the
    references."""
    rng = np.random.default_rng(seed)
    out = []
    for tier, drop in ((1, 0.1), (16, drop_16x)):
        for k in range(per_tier):
            d = drop + rng.normal(0, 0.05)
            mkpp = -2.5 + rng.normal(0, 0.05) if tier == 16 else rng.normal(0, 0.1)
            out += [score_row(f"m{tier}{k}", "base", tier, loss=4.0, bits=20.0),
                    score_row(f"m{tier}{k}", "tuned", tier, loss=4.0 - d, bits=10.0, mkpp=mkpp)]
    for k in range(n_refs):
        d = 0.1 + rng.normal(0, 0.05)
        out += [score_row(f"r{k}", "base", 0, loss=4.0, bits=20.0), score_row(f"r{k}", "tuned", 0, loss=4.0 - d, bits=19.5,
                                                                   mkpp=rng.normal(0, 0.1))]
    return out


def test_an_attack_inverted_where_another_separates_is_flagged_with_its_tier_and_p():
    out = summarize_metrics(inverted_scores())
    m, notes = out.metrics, out.notes
    assert m["mia.auc/loss_diff/rep_16"].value == 1.0 and m["mia.auc/min_k_pp_diff/rep_16"].value == 0.0
    note = notes["mia.inverted/min_k_pp_diff"]
    assert note.startswith("inverted, not a result: AUC 0.00 on the 16x tier (8 members against 20 references; one-sided")
    assert "where loss has 1.00" in note  # the first of the attacks that separate the tier
    assert "1x tier" not in note and "all members" not in note  # no attack separates there: nothing to compare with
    # the tuned-only score reads the same wrong sign; the loss family is sound
    assert {k for k in notes if k.startswith("mia.inverted/")} == {"mia.inverted/min_k_pp", "mia.inverted/min_k_pp_diff"}
    assert "mia.auc/min_k_pp_diff/rep_16" in m  # the metric keys stay: the note says how to read them


def test_an_inversion_chance_explains_is_not_flagged():
    """With 2 members and 6 references an attack without signal scores 1/12 with probability 2/28 = 0.07, and 0 with
    probability 1/28 = 0.036: neither is beyond chance once the ~20 attacks compared on the tier are paid for."""
    chance = inverted_scores(per_tier=2, n_refs=6)
    refs = sorted(r.mia_min_k_pp for r in chance if r.model == "tuned" and r.repetitions == 0)
    members = [r for r in chance if r.model == "tuned" and r.repetitions == 16]
    lifted = [r.model_copy(update={"mia_min_k_pp": (refs[0] + refs[1]) / 2}) if r is members[0] else r for r in chance]
    out = summarize_metrics(lifted)
    m, notes = out.metrics, out.notes
    assert m["mia.auc/min_k_pp_diff/rep_16"].value == pytest.approx(1 / 12, abs=1e-6)
    assert m["mia.auc/loss_diff/rep_16"].value == 1.0
    assert "mia.inverted/min_k_pp_diff" not in notes
    assert summarize_metrics(chance).metrics["mia.auc/min_k_pp_diff/rep_16"].value == 0.0
    assert "mia.inverted/min_k_pp_diff" not in summarize_metrics(chance).notes  # AUC 0: p = 1/28 > 0.05 / m


def test_no_flag_where_no_attack_separates_the_tier():
    out = summarize_metrics(inverted_scores(drop_16x=0.1))  # the 16x members moved as little as the references
    assert out.metrics["mia.auc/min_k_pp_diff/rep_16"].value == 0.0
    assert max(e.value for k, e in out.metrics.items() if k.startswith("mia.auc/") and k.endswith("/rep_16")) < 0.95
    assert not any(k.startswith("mia.inverted/") for k in out.notes)
