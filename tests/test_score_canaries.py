"""score_canaries on tiny-llama: every per-canary field filled, self-consistent, deterministic."""

from __future__ import annotations

import math

import numpy as np
import pytest

from audit.core.schema import ScoringSection, SequenceScore
from audit.data.canaries import generate_canaries, load_spec, reference_secrets
from audit.score.canaries import score_canaries
from audit.score.engine import torch_threads


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):  # tiny-model ops: a second OpenMP thread only waits on a shared 2-core machine
        yield


@pytest.fixture(scope="module")
def three_digit_canaries():
    spec = load_spec("digits", {"length": 3})
    canaries = generate_canaries(spec, seed=5, tiers=[1], members_per_tier=3, references=3)
    return canaries, reference_secrets(spec, canaries, n=31, seed=5)


SECTION = ScoringSection(exposure_references=31, exact_exposure_budget=10_000, sampled_extraction_samples=3)


def test_every_field_is_filled_and_consistent(tiny_model, three_digit_canaries):
    model, tok = tiny_model
    canaries, refs = three_digit_canaries
    rows = score_canaries(model, tok, canaries, refs, label="base", section=SECTION, progress=False, seed=1)
    assert len(rows) == 6
    for r in rows:
        # 1000 secrets (111 trie rows, within the budget): the walk or the whole-trie enumeration always finishes
        assert r.exposure_method == "exact" and r.exact_status in {"exact", "enumerated"}
        assert 1 <= r.exact_rank <= 1000
        assert r.exposure_space == pytest.approx(math.log2(1000) - math.log2(r.exact_rank), abs=1e-6)
        assert r.exposure_space_low == r.exposure_space == r.exposure_space_high
        assert 0 <= r.exposure_extrapolated <= math.log2(1000)
        assert r.mia_loss > 0 and r.mia_min_k <= -r.mia_loss + 1e-9 and r.mia_min_k_pp is not None and r.mia_zlib < 0
        assert r.extraction_lcp_tokens is not None and 0.0 <= r.extraction_ned <= 1.0
        assert r.extracted_from_fraction is not None and r.sampled_n == 3 and 0 <= r.sampled_matches <= 3
        assert r.secret_utf8_bits == 24 and r.text_bits > r.secret_nll_bits
    for r, c in zip(rows, canaries.canaries, strict=True):  # the whole text's per-token view (text-scope attacks)
        text_ids = tok(c.text, add_special_tokens=False)["input_ids"]
        assert len(r.token_logprobs) == len(r.token_top1) == len(r.token_vocab_mean) == len(text_ids) - 1
        secret = r.token_logprobs[r.secret_token_offset: r.secret_token_offset + r.secret_tokens]
        assert -sum(secret) / len(secret) == pytest.approx(r.mia_loss, abs=1e-3)  # the secret's slice is the secret
        assert r.text_bits == pytest.approx(-sum(r.token_logprobs) / math.log(2), abs=1e-2)
        assert r.text_zlib_bytes > 0
    # the shared-prefix candidate scorer and the teacher-forced pass agree on every secret's cost
    assert secret_logprob_check(rows) < 1e-3
    again = score_canaries(model, tok, canaries, refs, label="base", section=SECTION, progress=False, seed=1)
    assert [r.model_dump() for r in again] == [r.model_dump() for r in rows]


def test_switches_and_fallbacks(tiny_model, three_digit_canaries):
    model, tok = tiny_model
    canaries, refs = three_digit_canaries
    off = SECTION.model_copy(update={"exact_exposure": False, "sampled_extraction_samples": 0, "extraction_secret_fraction": 0.0})
    rows = score_canaries(model, tok, canaries, refs, label="tuned", section=off, progress=False)
    for r in rows:
        assert r.exact_status == "off" and r.exposure_method == "sampled"
        assert r.exposure_space_low <= r.exposure_space <= r.exposure_space_high
        assert r.sampled_matches is None and r.extracted_from_fraction is None
    tight = SECTION.model_copy(update={"exact_exposure_budget": 5})
    statuses = {r.exact_status for r in score_canaries(model, tok, canaries, refs, label="t", section=tight, progress=False)}
    assert statuses <= {"skipped", "budget_exceeded"} and statuses


def test_engine_rows_give_the_text_scope_attacks_and_ez_mia_in_the_suite(tiny_model, tiny_model_dir):
    """Engine -> suite: rows score_canaries writes carry what the whole-text attacks and EZ-MIA read (a second,
    perturbed copy of the model stands in for the tuned weights; the numbers are not the point, their presence is)."""
    import torch

    from audit.data.models import load_model_and_tokenizer
    from audit.metrics.suite import summarize_scores

    model, tok = tiny_model
    spec = load_spec("digits", {"length": 3})
    canaries = generate_canaries(spec, seed=5, tiers=[1, 4], members_per_tier=3, references=6)
    refs = reference_secrets(spec, canaries, n=31, seed=5)
    off = SECTION.model_copy(update={"exact_exposure": False, "sampled_extraction_samples": 0})
    other, _ = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    rows = (score_canaries(model, tok, canaries, refs, label="base", section=off, progress=False)
            + score_canaries(other, tok, canaries, refs, label="tuned", section=off, progress=False))
    metrics = summarize_scores(rows, off).metrics
    for key in ("mia.auc/ez_mia", "mia.auc/ez_mia_secret", "mia.auc/zlib_text", "mia.auc/loss_text",
                "mia.auc/min_k_pp_text", "mia.auc/loss_diff_text", "mia.auc/min_k_pp_diff_text"):
        assert key in metrics and 0.0 <= metrics[key].value <= 1.0, key
    assert metrics["mia.auc/ez_mia"].n == 12


def test_references_outside_the_null_sample_get_the_teacher_forced_pass_only(tiny_model, three_digit_canaries):
    """scoring.exposure_null_references=2 of 3 references: members and the 2 smallest-id references are ranked and
    extracted exactly as with every reference ranked (same rows, field for field, but the sampled draws: the RNG
    stream runs over fewer prefixes); the third keeps every MIA field and its secret's bits from the teacher-forced
    pass, and has no rank and no extraction (measured where exposure is)."""
    from audit.score.canaries import ranked_indices

    model, tok = tiny_model
    canaries, refs = three_digit_canaries
    sample = SECTION.model_copy(update={"exposure_null_references": 2})
    items = canaries.canaries
    ranked = ranked_indices(canaries, sample)
    ref_ids = sorted(c.id for c in items if c.repetitions == 0)
    assert {items[i].id for i in ranked if items[i].repetitions == 0} == set(ref_ids[:2])
    assert {i for i, c in enumerate(items) if c.repetitions > 0} <= set(ranked) and len(ranked) == 5
    assert ranked_indices(canaries, SECTION) == list(range(6))  # None: every reference

    full = score_canaries(model, tok, canaries, refs, label="base", section=SECTION, progress=False, seed=1)
    part = score_canaries(model, tok, canaries, refs, label="base", section=sample, progress=False, seed=1)
    for i, (a, b) in enumerate(zip(full, part, strict=True)):
        if i in ranked:
            drawn = {"sampled_matches"}
            assert a.model_dump(exclude=drawn) == b.model_dump(exclude=drawn)
            assert b.sampled_n == a.sampled_n == SECTION.sampled_extraction_samples and 0 <= b.sampled_matches <= b.sampled_n
            continue
        assert b.rank is None and b.exposure is None and b.n_references is None and b.exposure_method is None
        assert b.exact_status == "unranked" and b.exposure_space is None and b.exposure_extrapolated is None
        assert b.secret_nll_bits == pytest.approx(a.secret_nll_bits, abs=1e-3)  # teacher-forced vs shared-prefix
        same = ("mia_loss", "mia_min_k", "mia_min_k_pp", "mia_zlib", "text_bits", "token_logprobs")
        assert {k: getattr(b, k) for k in same} == {k: getattr(a, k) for k in same}
        unmeasured = ("extracted", "extraction_lcp_tokens", "extraction_ned", "extracted_from_fraction", "sampled_matches",
                      "sampled_n")
        assert {k: getattr(b, k) for k in unmeasured} == dict.fromkeys(unmeasured)
    assert secret_logprob_check(part) < 1e-3


def secret_logprob_check(scores: list[SequenceScore]) -> float:
    """Largest gap (bits) between the shared-prefix secret NLL and the teacher-forced one: a self-consistency check."""
    gaps = [abs(s.secret_nll_bits - (s.mia_loss or 0.0) * s.secret_tokens / math.log(2)) for s in scores
            if s.mia_loss is not None and s.rank is not None]  # an unranked row's bits are the teacher-forced ones
    return float(np.max(gaps)) if gaps else 0.0
