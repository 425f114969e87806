"""Scoring on CUDA gives the numbers CPU fp32 gives, on the same tiny-llama weights (marker ``gpu``).

Every figure in the docs was measured on CPU; these tests are what stands between a GPU run and a silently different
audit. In fp32 the two devices differ only by kernel summation order, so per-token log-probabilities agree to about
1e-5 nats on a 0.2M-parameter model; the tolerances below leave two orders of magnitude for that and would still
catch a wrong dtype (bf16 logits move bits by ~1e-2, tests/test_precision.py) or a padding/cache bug (whole bits).
They skip themselves without CUDA (tests/conftest.py skips every ``gpu`` test there).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audit.core.schema import SecretSpace
from audit.score.engine import candidate_nll_bits, score_token_sequences, split_tokens, split_tokens_many
from audit.score.exposure_search import exact_rank, parse_secret, symbol_tokens

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PREFIX = "Note for the file: the vault access code of Ms. Halloway is "
SECRETS = [f"{i:06d}" for i in range(0, 1_000_000, 7919)][:48]
TEXTS = [f"{PREFIX}{s}." for s in SECRETS[:16]] + ["Colorless green ideas sleep furiously", "a", "the the the the"]
BITS_TOL = 1e-3  # bits per candidate (a 6-digit secret is ~7 tokens)
NATS_TOL = 1e-4  # nats per token


def _load(path, device: str):
    from audit.data.models import load_model_and_tokenizer

    return load_model_and_tokenizer(path, dtype=torch.float32, device=device)


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    cpu, tok = _load(tiny_model_dir, "cpu")
    cuda, _ = _load(tiny_model_dir, "cuda")
    assert next(cuda.parameters()).device.type == "cuda" and next(cuda.parameters()).dtype == torch.float32
    return cpu, cuda, tok


def test_teacher_forced_scores_on_cuda_equal_cpu_fp32(models):
    cpu, cuda, tok = models
    seqs = [tok(t, add_special_tokens=True)["input_ids"] for t in TEXTS]
    on_cpu = score_token_sequences(cpu, seqs, pad_token_id=tok.pad_token_id)
    on_cuda = score_token_sequences(cuda, seqs, pad_token_id=tok.pad_token_id)
    for a, b in zip(on_cpu, on_cuda, strict=True):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=NATS_TOL, rtol=0)
        np.testing.assert_allclose(b.vocab_mean, a.vocab_mean, atol=NATS_TOL, rtol=0)
        np.testing.assert_allclose(b.vocab_var, a.vocab_var, atol=10 * NATS_TOL, rtol=1e-5)


def test_candidate_bits_on_cuda_equal_cpu_fp32(models):
    cpu, cuda, tok = models
    head = split_tokens(tok, PREFIX, SECRETS[0]).prefix_ids
    cands = [s.secret_ids for s in split_tokens_many(tok, PREFIX, SECRETS)]
    on_cpu = np.array(candidate_nll_bits(cpu, head, cands))
    on_cuda = np.array(candidate_nll_bits(cuda, head, cands))
    assert on_cpu.min() > 1.0  # a real score, not an empty one that would agree trivially
    np.testing.assert_allclose(on_cuda, on_cpu, atol=BITS_TOL, rtol=0)
    assert list(np.argsort(on_cuda, kind="stable")[:5]) == list(np.argsort(on_cpu, kind="stable")[:5])


def test_the_exact_rank_walk_on_cuda_finds_the_cpu_rank(models):
    cpu, cuda, tok = models
    space = SecretSpace(alphabet=list("0123456789"), length=3)
    for secret in ("000", "481", "907"):
        table = symbol_tokens(tok, PREFIX, space, secret)
        canary = parse_secret(space, secret)
        on_cpu = exact_rank(cpu, table, canary, node_budget=None)
        on_cuda = exact_rank(cuda, table, canary, node_budget=None)
        assert on_cpu.status == on_cuda.status == "exact" and on_cuda.rank == on_cpu.rank, secret
