"""The metric suite on hand-made per-canary rows: keys, values, refusals, privacy bound."""

from __future__ import annotations

import math

import pytest

from audit.metrics import epsilon_ceiling_one_run, epsilon_lower_bound_one_run
from audit.metrics.suite import attack_scores, summarize_metrics
from audit.schema import SequenceScore


def row(cid: str, model: str, reps: int, *, loss: float, bits: float, mkpp: float = 0.0, extracted=False, sampled=0):
    return SequenceScore(canary_id=cid, model=model, repetitions=reps, secret_tokens=6, secret_nll_bits=bits, rank=1,
                         n_references=255, exposure=8.0, extracted=extracted, exposure_method="sampled", exposure_space=10.0,
                         exposure_space_low=5.0, exposure_space_high=19.9, mia_loss=loss, mia_min_k=-loss, mia_min_k_pp=mkpp,
                         mia_zlib=-loss / 10, extraction_lcp_tokens=6 if extracted else 0, extraction_ned=0.0 if extracted else 1.0,
                         extracted_from_fraction=extracted, sampled_matches=sampled, sampled_n=4, secret_utf8_bits=48)


def scores(n_refs: int = 3):
    out = []
    for k, drop in enumerate([3.0, 2.5, 2.0]):  # members: fine-tuning lowered their loss a lot
        out += [row(f"m{k}", "base", 4, loss=4.0, bits=20.0), row(f"m{k}", "tuned", 4, loss=4.0 - drop, bits=1.0 + k,
                                                                    mkpp=1.0, extracted=k == 0, sampled=2 if k == 0 else 0)]
    for k in range(n_refs):  # references: barely moved
        out += [row(f"r{k}", "base", 0, loss=4.0, bits=20.0), row(f"r{k}", "tuned", 0, loss=3.9 + 0.01 * k, bits=19.5)]
    return out


def test_attack_scores_orientation():
    tuned, base = row("a", "tuned", 4, loss=1.0, bits=1, mkpp=2.0), row("a", "base", 4, loss=4.0, bits=1, mkpp=0.5)
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
