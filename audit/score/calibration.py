"""A scoring backend's error bar: a fixed subset of canaries scored again by the reference, and the gap recorded.

Any backend or precision other than the reference (the HF engine in fp32) computes the numbers the audit reads with
its own rounding: ``scoring.precision: bf16`` moved SmolLM2's candidate bits by up to 0.46 bits on CPU; a vLLM
backend (docs/scale.md) differs from transformers by up to 0.32 nats per token (vllm#18352). Rather than trust it,
an audit scored that way rescores ``scoring.calibration_canaries`` canaries with the reference and records, per
model (``report.calibration``, metrics ``calibration.*/<model>`` that gates can hold):

* ``candidate_bits_max_abs`` / ``_sd``: -log2 p(reference secret | canary prefix) for the first
  ``scoring.calibration_references`` reference secrets after each calibration canary's prefix, backend minus reference;
* ``rank_mismatches``: calibration canaries whose rank among those references (1 + references scoring <= the
  canary, ties against it, as the audit ranks) differs;
* tuned models only: the canaries' own secret bits and every token's ln p of the canary texts.

The base model's numbers leave out the canaries' own secrets: its weights are public, so a published function of
them would check guesses (:mod:`audit.metrics.disclosure`); the reference secrets are drawn under the audit key and
never inserted. The subset: members of the highest tiers first (where the exact walk and the headline exposures
are), then by id (a keyed hash: fixed before any model is scored, the same for every model of the run).

Backend-agnostic: both sides are scoring backends (:mod:`audit.score.backend`), of which calibration uses two
requests (log-probabilities of chosen candidates after a shared prefix; per-token log-probabilities of whole texts).
The recipe's ``scoring.backend`` in ``scoring.precision`` is compared with the HF engine in fp32; another backend is a
new module registered there, not a branch here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from audit.core.schema import CalibrationSummary, CanarySet, MetricEntry, ScoringSection
from audit.score.backend import ScoringBackend, open_backend

REFERENCE = "hf/fp32"
AUTO_CANARIES = 8


def backend_label(backend: ScoringBackend) -> str:
    """``hf/bf16``: the engine and the precision it scored in."""
    return f"{backend.name}/{backend.precision}"


@contextlib.contextmanager
def hf_scorer(model: Any, tokenizer: Any, precision: str, *, batch_size: int = 64) -> Iterator[ScoringBackend]:
    """The HF engine scoring ``model`` in ``precision`` for the block (the model is cast once, as the audit scores)."""
    with open_backend("hf", model, tokenizer, precision=precision, batch_size=batch_size) as backend:
        yield backend


def calibration_size(section: ScoringSection) -> int:
    """Canaries to calibrate on: ``scoring.calibration_canaries``, or when unset 8 unless the audit scores in fp32
    with the HF engine (the reference itself: nothing to calibrate)."""
    if section.calibration_canaries is not None:
        return section.calibration_canaries
    return 0 if f"{section.backend}/{section.precision}" == REFERENCE else AUTO_CANARIES


def calibration_indices(canaries: CanarySet, n: int) -> list[int]:
    """The ``n`` canaries calibrated on: highest repetitions first (members before never-inserted references), then
    by id; returned in canary-set order."""
    items = canaries.canaries
    order = sorted(range(len(items)), key=lambda i: (-items[i].repetitions, items[i].id))
    return sorted(order[:n])


@dataclass(frozen=True)
class SubsetScores:
    """One scorer's numbers on the calibration subset."""

    reference_bits: np.ndarray
    """[canaries, references]: bits of each reference secret after each canary's prefix."""
    secret_bits: np.ndarray
    """[canaries]: bits of each canary's own secret after its prefix."""
    token_logprobs: list[np.ndarray]
    """Per canary, ln p of tokens 1..n-1 of its whole text."""

    @property
    def ranks(self) -> np.ndarray:
        return 1 + np.sum(self.reference_bits <= self.secret_bits[:, None], axis=1)


def score_subset(scorer: ScoringBackend, tokenizer: Any, canaries: CanarySet, indices: Sequence[int],
                 reference_secrets: Sequence[str]) -> SubsetScores:
    """``scorer``'s numbers for the canaries at ``indices``: each secret with ``reference_secrets`` after its prefix,
    and its whole text teacher-forced."""
    from audit.score.canaries import _text_tokens
    from audit.score.engine import split_tokens, split_tokens_many

    rows, texts = [], []
    for i in indices:
        canary = canaries.canaries[i]
        split = split_tokens(tokenizer, canary.prefix, canary.secret)
        refs = [r.secret_ids for r in split_tokens_many(tokenizer, canary.prefix, list(reference_secrets))]
        rows.append(scorer.candidate_bits(split.prefix_ids, [split.secret_ids, *refs]))
        texts.append(_text_tokens(tokenizer, canary, split))
    bits = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(reference_secrets) + 1)
    return SubsetScores(reference_bits=bits[:, 1:], secret_bits=bits[:, 0],
                        token_logprobs=[np.asarray(x.logprobs, dtype=np.float64) for x in scorer.token_logprobs(texts)])


def compare_subset(backend: SubsetScores, reference: SubsetScores, *, model: str, backend_name: str,
                   reference_name: str = REFERENCE, with_secrets: bool) -> CalibrationSummary:
    """The gap of ``backend`` to ``reference`` (pure: arrays in, numbers out). ``with_secrets``: also the canaries'
    own secret bits and text log-probs (never for public weights, see the module docstring)."""
    d = backend.reference_bits - reference.reference_bits
    secret = token = None
    if with_secrets:
        secret = round(float(np.max(np.abs(backend.secret_bits - reference.secret_bits))), 6)
        token = round(max((float(np.max(np.abs(a - b))) for a, b in zip(backend.token_logprobs, reference.token_logprobs,
                                                                         strict=True) if len(a)), default=0.0), 6)
    return CalibrationSummary(
        model=model, backend=backend_name, reference=reference_name, n_canaries=int(d.shape[0]),
        n_references=int(d.shape[1]), candidate_bits_max_abs=round(float(np.max(np.abs(d))), 6),
        candidate_bits_sd=round(float(np.std(d)), 6),
        rank_mismatches=int(np.sum(backend.ranks != reference.ranks)),
        secret_bits_max_abs=secret, token_logprob_max_abs_nats=token)


def calibrate(backend: ScoringBackend, reference: ScoringBackend, tokenizer: Any, canaries: CanarySet,
              reference_secrets: Sequence[str], *, model: str, n_canaries: int, n_references: int) -> CalibrationSummary | None:
    """``backend``'s gap to ``reference`` on :func:`calibration_indices` with the first ``n_references`` reference
    secrets; None when there is nothing to calibrate on (``n_canaries`` 0, no canary or no reference)."""
    indices = calibration_indices(canaries, n_canaries)
    refs = list(reference_secrets)[:n_references]
    if not indices or not refs:
        return None
    return compare_subset(score_subset(backend, tokenizer, canaries, indices, refs),
                          score_subset(reference, tokenizer, canaries, indices, refs),
                          model=model, backend_name=backend_label(backend), reference_name=backend_label(reference),
                          with_secrets=model != "base")


def calibration_metrics(summaries: Sequence[CalibrationSummary]) -> dict[str, MetricEntry]:
    """The flat metrics a gate can hold: ``calibration.bits_max_abs/<model>`` (n: candidates compared) and
    ``calibration.rank_mismatches/<model>`` (n: canaries)."""
    out = {}
    for s in summaries:
        out[f"calibration.bits_max_abs/{s.model}"] = MetricEntry(value=s.candidate_bits_max_abs,
                                                                 n=s.n_canaries * s.n_references)
        out[f"calibration.rank_mismatches/{s.model}"] = MetricEntry(value=float(s.rank_mismatches), n=s.n_canaries)
    return out


def calibrate_scoring(model: Any, tokenizer: Any, canaries: CanarySet, reference_secrets: Sequence[str], *,
                      section: ScoringSection, label: str) -> CalibrationSummary | None:
    """The audit's scoring (``section.backend`` in ``section.precision``) calibrated against the HF engine in fp32
    (None when off)."""
    n = calibration_size(section)
    if n == 0:
        return None
    with hf_scorer(model, tokenizer, "fp32", batch_size=section.batch_size) as reference, \
            open_backend(section.backend, model, tokenizer, precision=section.precision,
                         batch_size=section.batch_size) as backend:
        return calibrate(backend, reference, tokenizer, canaries, reference_secrets, model=label, n_canaries=n,
                         n_references=section.calibration_references)
