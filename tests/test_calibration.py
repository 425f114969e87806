"""The backend error bar (audit.score.calibration): a scoring backend or precision other than the HF engine in fp32
records its gap to it on a few canaries, in report.json and as metrics a gate can hold."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from audit.core.schema import ScoringSection
from audit.data.canaries import generate_canaries, load_spec
from audit.score.calibration import (
    SubsetScores,
    calibrate,
    calibrate_scoring,
    calibration_indices,
    calibration_metrics,
    calibration_size,
    compare_subset,
    hf_scorer,
)


def _subset(ref_bits, secret_bits, tokens=((-1.0, -2.0),)) -> SubsetScores:
    return SubsetScores(np.array(ref_bits, dtype=float), np.array(secret_bits, dtype=float), [np.array(t) for t in tokens])


def test_the_gap_is_measured_on_the_references_and_on_the_secrets_only_for_a_tuned_model():
    reference = _subset([[10.0, 12.0, 14.0], [9.0, 11.0, 13.0]], [11.0, 15.0])
    backend = _subset([[10.25, 12.0, 14.0], [9.0, 11.0, 12.9]], [11.5, 15.0], tokens=((-1.0, -2.5),))
    tuned = compare_subset(backend, reference, model="tuned", backend_name="hf/bf16", with_secrets=True)
    assert (tuned.n_canaries, tuned.n_references) == (2, 3)
    assert tuned.candidate_bits_max_abs == pytest.approx(0.25)
    assert tuned.candidate_bits_sd == pytest.approx(float(np.std([0.25, 0, 0, 0, 0, -0.1])), abs=1e-6)
    # canary 0: rank 2 (10 <= 11) under both; canary 1: 4 under both (every reference <= 15)
    assert tuned.rank_mismatches == 0
    assert tuned.secret_bits_max_abs == pytest.approx(0.5) and tuned.token_logprob_max_abs_nats == pytest.approx(0.5)
    base = compare_subset(backend, reference, model="base", backend_name="hf/bf16", with_secrets=False)
    assert base.secret_bits_max_abs is None and base.token_logprob_max_abs_nats is None  # public weights: no checker
    flipped = compare_subset(_subset([[10.0, 12.0, 14.0], [9.0, 11.0, 13.0]], [12.5, 15.0]), reference, model="tuned",
                             backend_name="x", with_secrets=True)
    assert flipped.rank_mismatches == 1  # 12.5 passes the 12.0 reference: rank 2 -> 3


def test_metrics_carry_the_sample_sizes_a_gate_and_the_disclosure_rule_read():
    s = compare_subset(_subset([[1.0, 2.0]], [1.5]), _subset([[1.0, 2.25]], [1.5]), model="tuned", backend_name="x",
                       with_secrets=True)
    m = calibration_metrics([s])
    assert m["calibration.bits_max_abs/tuned"].value == pytest.approx(0.25) and m["calibration.bits_max_abs/tuned"].n == 2
    assert m["calibration.rank_mismatches/tuned"].value == 0 and m["calibration.rank_mismatches/tuned"].n == 1


@pytest.mark.parametrize("precision, asked, expected", [("fp32", None, 0), ("bf16", None, 8), ("fp16", None, 8),
                                                        ("bf16", 0, 0), ("fp32", 3, 3)])
def test_calibration_is_on_by_default_only_when_the_audit_is_not_scored_by_the_reference(precision, asked, expected):
    assert calibration_size(ScoringSection(precision=precision, calibration_canaries=asked)) == expected


def test_the_subset_is_the_top_tiers_members_then_by_id():
    canaries = generate_canaries(load_spec("digits"), seed=0, tiers=[1, 4, 16], members_per_tier=3, references=4)
    items = canaries.canaries
    picked = calibration_indices(canaries, 4)
    assert picked == sorted(picked)
    assert sorted(items[i].repetitions for i in picked) == [4, 16, 16, 16]
    fours = sorted(c.id for c in items if c.repetitions == 4)
    assert [items[i].id for i in picked if items[i].repetitions == 4] == fours[:1]
    assert len(calibration_indices(canaries, 100)) == len(items)


@dataclass(frozen=True)
class Shifted:
    """A second 'backend': the reference's numbers, every reference candidate's bits moved by ``shift``."""

    inner: object
    shift: float
    name: str = "fake"
    precision: str = "shifted"

    def candidate_bits(self, prefix_ids, candidates):
        bits = self.inner.candidate_bits(prefix_ids, candidates)
        return [bits[0]] + [b + self.shift for b in bits[1:]]

    def token_logprobs(self, sequences, *, vocab_stats=False):
        return self.inner.token_logprobs(sequences, vocab_stats=vocab_stats)


@pytest.fixture(scope="module")
def small_set():
    canaries = generate_canaries(load_spec("digits"), seed=0, tiers=[1, 4], members_per_tier=2, references=2)
    refs = [f"{i:06d}" for i in range(0, 300000, 20011)][:9]
    return canaries, refs


def test_any_backend_behind_the_two_primitives_is_calibrated(tiny_model, small_set):
    model, tok = tiny_model
    canaries, refs = small_set
    with hf_scorer(model, tok, "fp32") as reference:
        got = calibrate(Shifted(reference, 0.5), reference, tok, canaries, refs, model="tuned", n_canaries=3, n_references=5)
    assert got.backend == "fake/shifted" and got.reference == "hf/fp32"
    assert (got.n_canaries, got.n_references) == (3, 5)
    assert got.candidate_bits_max_abs == pytest.approx(0.5, abs=1e-6) and got.candidate_bits_sd == pytest.approx(0, abs=1e-6)
    assert got.secret_bits_max_abs == 0 and got.token_logprob_max_abs_nats == 0
    assert calibrate(Shifted(reference, 0.5), reference, tok, canaries, refs, model="tuned", n_canaries=0,
                     n_references=5) is None


def test_bf16_scoring_of_the_hf_engine_gets_its_error_bar_against_fp32(tiny_model, small_set):
    model, tok = tiny_model
    canaries, refs = small_set
    before = [p.detach().clone() for p in model.parameters()]
    section = ScoringSection(precision="bf16", calibration_references=8)
    got = calibrate_scoring(model, tok, canaries, refs, section=section, label="tuned")
    assert got.backend == "hf/bf16" and got.n_canaries == len(canaries.canaries) and got.n_references == 8
    assert 1e-4 < got.candidate_bits_max_abs < 5  # bf16 rounds the logits: a real, bounded gap
    assert 0 < got.token_logprob_max_abs_nats < 5
    assert all(p.dtype == b.dtype and bool((p == b).all()) for p, b in zip(model.parameters(), before, strict=True))
    assert calibrate_scoring(model, tok, canaries, refs, section=ScoringSection(), label="tuned") is None  # fp32: the reference


def test_a_rounded_copy_of_a_model_carrying_trls_fused_head_scores_its_own_weights(tiny_model_dir):
    """TRL's SFTTrainer patches model.forward (add_fused_lm_head) with a closure over the original's bound forward; the
    bf16 copy that scoring.precision=bf16 scores must not run the fp32 original through it."""
    import torch
    from trl.trainer.utils import add_fused_lm_head

    from audit.data.models import load_model_and_tokenizer
    from audit.score.engine import candidate_nll_bits, in_scoring_precision, split_tokens

    def bits(model, tok):
        s = split_tokens(tok, "The code is", " 4815 1623 42")
        return candidate_nll_bits(model, s.prefix_ids, [s.secret_ids])[0]

    plain, tok = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")
    patched, _ = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")
    add_fused_lm_head(patched)
    assert "forward" in vars(patched)
    with in_scoring_precision(plain, torch.bfloat16) as p16, in_scoring_precision(patched, torch.bfloat16) as q16:
        assert bits(q16, tok) == bits(p16, tok)
    assert bits(patched, tok) == bits(plain, tok) != bits(p16, tok)  # fp32 untouched, and bf16 does round


def test_a_bf16_scored_audit_records_the_gap_in_its_report_and_a_resume_keeps_it(in_tmp):
    from audit.cli import main
    from audit.report import read_report

    args = ["run", "tiny/lora_cpu", "scoring.precision=bf16", "scoring.calibration_canaries=3",
            "scoring.calibration_references=15", "scoring.exposure_references=31", "tracking.enabled=false", "--quiet"]
    assert main(args) == 0
    (run_dir,) = (in_tmp / "runs").iterdir()
    report = read_report(run_dir / "report.json")
    by_model = {c.model: c for c in report.calibration}
    assert set(by_model) == {"base", "tuned"}
    assert by_model["tuned"].backend == "hf/bf16" and by_model["tuned"].n_references == 15
    assert by_model["tuned"].candidate_bits_max_abs > 0 and by_model["tuned"].secret_bits_max_abs is not None
    assert by_model["base"].secret_bits_max_abs is None
    assert report.metrics["calibration.bits_max_abs/tuned"].value == by_model["tuned"].candidate_bits_max_abs
    stored = (run_dir / "calibration_tuned.json").read_text()
    assert json.loads(stored)["model"] == "tuned"
    in_process = (run_dir / "scores_tuned.jsonl").read_bytes()
    # a resume reuses the base's stored gap and recomputes the tuned model's from its saved weights reloaded: bf16
    # scores and gap are those of the trained model in process (TRL's patched forward no longer leaks into the copy)
    for name in ("scores_tuned.jsonl", "calibration_tuned.json", "scores.jsonl", "report.json"):
        (run_dir / name).unlink()
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    assert (run_dir / "scores_tuned.jsonl").read_bytes() == in_process
    assert (run_dir / "calibration_tuned.json").read_text() == stored
    assert read_report(run_dir / "report.json").calibration == report.calibration
