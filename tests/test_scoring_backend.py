"""The scoring-backend seam: a second, deliberately naive engine (one sequence at a time, no cache, no batching) gives
the batched HF engine's numbers, request by request and through a whole audit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from audit.core.errors import AuditError
from audit.core.schema import SecretSpace
from audit.score.backend import ScoringBackend, check_backend
from audit.score.engine import split_tokens, split_tokens_many
from audit.score.exposure_search import exact_rank, parse_secret, symbol_tokens
from audit.score.hf_backend import HFBackend
from audit.score.loop_backend import LoopBackend

PREFIX = "Note for the file: the vault access code of Ms. Halloway is "
BITS_TOL = 1e-4


@pytest.fixture(scope="module")
def both(tiny_model):
    model, tok = tiny_model
    return HFBackend(model, tok, batch_size=4), LoopBackend(model, "fp32", tok), tok


def test_both_engines_are_backends_and_name_themselves(both):
    hf, loop, _ = both
    assert isinstance(hf, ScoringBackend) and isinstance(loop, ScoringBackend)
    assert (hf.name, hf.precision, loop.name, loop.precision) == ("hf", "fp32", "loop", "fp32")


def test_token_logprobs_and_the_vocabulary_statistics_agree(both):
    hf, loop, tok = both
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in (PREFIX + "123456", "a b", "x", PREFIX)]
    for a, b in zip(hf.token_logprobs(seqs, vocab_stats=True), loop.token_logprobs(seqs, vocab_stats=True), strict=True):
        assert len(a.logprobs) == len(b.logprobs) == len(a.token_ids) - 1
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        np.testing.assert_allclose(a.vocab_mean, b.vocab_mean, atol=1e-5)
        np.testing.assert_allclose(a.vocab_var, b.vocab_var, atol=1e-4)
        assert (a.top1 == b.top1).all()
    assert loop.token_logprobs(seqs)[0].vocab_mean is None


def test_candidate_bits_agree_and_greedy_continuations_are_the_same_tokens(both):
    hf, loop, tok = both
    secrets = ["123456", "000000", "999999", "12", "4242424242"]
    head = split_tokens(tok, PREFIX, secrets[0]).prefix_ids
    cands = [s.secret_ids for s in split_tokens_many(tok, PREFIX, secrets)]
    np.testing.assert_allclose(hf.candidate_bits(head, cands), loop.candidate_bits(head, cands), atol=BITS_TOL)
    prefixes = [head, head[:5], head + cands[0][:2]]
    assert hf.generate(prefixes, max_new_tokens=6) == loop.generate(prefixes, max_new_tokens=6)
    sampled = loop.generate(prefixes, max_new_tokens=4, samples=3, seed=1)
    assert [[len(x) for x in per] for per in sampled] == [[4, 4, 4]] * 3
    assert sampled == loop.generate(prefixes, max_new_tokens=4, samples=3, seed=1)  # seeded


def test_free_samples_at_top_k_1_are_the_greedy_text_in_both_engines(both):
    """The outputs stage's request: one text per prompt, cut before end-of-text; at top-k 1 there is nothing to draw."""
    hf, loop, tok = both
    prompts = [tok("Note:", add_special_tokens=False)["input_ids"], [tok.bos_token_id or tok.eos_token_id]] * 2
    ask = dict(max_new_tokens=7, temperature=1.0, top_k=1, top_p=1.0, seed=3, batch_size=3)
    got = loop.sample_until_end(prompts, **ask)
    assert got == hf.sample_until_end(prompts, **ask)
    assert all(len(x) <= 7 and tok.eos_token_id not in x for x in got)
    drawn = dict(ask, top_k=0, top_p=0.9)
    assert loop.sample_until_end(prompts, **drawn) == loop.sample_until_end(prompts, **drawn)  # seeded


@pytest.mark.parametrize(("space", "prefix", "secrets"), [
    (SecretSpace(alphabet=list("0123456789"), length=3), PREFIX, ["000", "123", "987"]),
    (SecretSpace(alphabet=["canoe", "zebra", "xylo", "quartz"], length=3, separator=" "), "the passphrase is ",
     ["canoe zebra xylo", "quartz quartz canoe"]),
], ids=["one-token digits", "multi-token words"])
def test_the_exact_walk_ranks_the_same_through_either_engine(both, space, prefix, secrets):
    """The HF walk keeps each path's keys/values between levels (one new position per node); the loop recomputes
    every path from scratch. Same ranks, same nodes, same canary bits."""
    hf, loop, tok = both
    for secret in secrets:
        table = symbol_tokens(tok, prefix, space, secret)
        canary = parse_secret(space, secret)
        for prune in (True, False):
            a = exact_rank(hf, table, canary, node_budget=None, prune=prune)
            b = exact_rank(loop, table, canary, node_budget=None, prune=prune)
            assert a.status == b.status == "exact"
            assert (a.rank, a.nodes_evaluated, a.frontier) == (b.rank, b.nodes_evaluated, b.frontier)
            assert a.canary_nll_bits == pytest.approx(b.canary_nll_bits, abs=BITS_TOL)


def test_an_unknown_backend_is_refused_with_a_suggestion():
    assert check_backend("loop") == "loop"
    with pytest.raises(AuditError, match="unknown scoring backend 'hff'") as err:
        check_backend("hff")
    assert "did you mean 'hf'" in err.value.fix


EXACT = ("rank", "n_references", "exposure", "exact_status", "exact_rank", "exact_nodes", "exposure_method", "extracted",
         "extraction_lcp_tokens", "extracted_from_fraction", "secret_tokens", "token_top1")
CLOSE = ("secret_nll_bits", "text_bits", "mia_loss", "mia_min_k", "mia_min_k_pp", "mia_zlib", "exposure_space",
         "exposure_space_low", "exposure_space_high")
FITTED_TOL = 1e-2
"""``exposure_extrapolated`` is not a score but a skew-normal maximum-likelihood fit to the references' bits, read far
in its tail: scipy's optimizer stops at its own tolerance (~1e-4 in the parameters), and 1e-6-bit input differences
moved an 18.7-bit extrapolation by 1.3e-3 bits. It is held to 1e-2 bits."""
"""Sampled extraction (``sampled_matches``) is left out: the loop draws its samples one at a time from its own
stream, so its samples are others than the batched engine's, by design (each is a fair draw)."""


def _run(tmp: Path, *overrides: str) -> Path:
    import os

    from audit.cli import main

    tmp.mkdir()
    old = Path.cwd()
    os.chdir(tmp)
    try:
        assert main(["run", "tiny/lora_cpu", "--quiet", "--no-tracking", "--no-fail-on-gates", *overrides]) == 0
    finally:
        os.chdir(old)
    (run,) = (tmp / "runs").iterdir()
    return run


def test_the_whole_tiny_audit_scored_by_the_loop_gives_the_same_scores_and_ranks(tmp_path):
    from audit.report import read_report

    # fewer references and a smaller walk budget than the recipe's, no sampled extraction (not compared, below): the
    # loop runs one pass per candidate and per trie node; the walk is compared in full above
    trim = ("scoring.exposure_references=63", "scoring.exact_exposure_budget=300", "scoring.sampled_extraction_samples=0")
    hf_run = _run(tmp_path / "hf", *trim)
    loop_run = _run(tmp_path / "loop", *trim, "scoring.backend=loop", "scoring.calibration_canaries=2")
    assert (loop_run / "canaries.jsonl").read_bytes() == (hf_run / "canaries.jsonl").read_bytes()
    rows = {}
    for run in (hf_run, loop_run):
        rows[run] = {(r["model"], r["canary_id"]): r for r in map(json.loads, (run / "scores.jsonl").read_text().splitlines())}
    hf, loop = rows[hf_run], rows[loop_run]
    assert hf.keys() == loop.keys() and len(hf) == 24
    assert any(r["exact_status"] == "budget_exceeded" for r in hf.values())  # the walk ran, as far as its budget
    for key, a in hf.items():
        b = loop[key]
        assert {f: a[f] for f in EXACT} == {f: b[f] for f in EXACT}, key
        for f in CLOSE:
            assert (a[f] is None) == (b[f] is None) and (a[f] is None or abs(a[f] - b[f]) <= BITS_TOL), (key, f)
        fitted = a["exposure_extrapolated"], b["exposure_extrapolated"]
        assert fitted == (None, None) or abs(fitted[0] - fitted[1]) <= FITTED_TOL, key
        for f in ("token_logprobs", "token_vocab_mean", "token_vocab_var"):
            np.testing.assert_allclose(a[f], b[f], atol=BITS_TOL)
    reports = {r: read_report(r / "report.json") for r in (hf_run, loop_run)}
    by = {r: [(s.model, s.backend, s.precision) for s in report.scored_by] for r, report in reports.items()}
    assert by[hf_run] == [("base", "hf", "fp32"), ("tuned", "hf", "fp32")]
    assert by[loop_run] == [("base", "loop", "fp32"), ("tuned", "loop", "fp32")]
    assert reports[hf_run].calibration is None  # the HF engine in fp32 is the reference itself
    calibration = {c.model: c for c in reports[loop_run].calibration}  # the loop's error bar against it
    assert sorted(calibration) == ["base", "tuned"]
    for c in calibration.values():
        assert (c.backend, c.reference, c.n_canaries, c.rank_mismatches) == ("loop/fp32", "hf/fp32", 2, 0)
        assert c.candidate_bits_max_abs <= BITS_TOL
