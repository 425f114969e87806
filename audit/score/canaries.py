"""Score a canary set under one model: Secret Sharer exposure against sampled references, and greedy extraction."""

from __future__ import annotations

import math
from typing import Any

from audit.metrics.exposure import exposure_from_rank, rank_against_references
from audit.schema import CanarySet, ScoringSection, SequenceScore
from audit.score.engine import candidate_nll_bits, greedy_continuations, split_tokens


def score_canaries(
    model: Any,
    tokenizer: Any,
    canaries: CanarySet,
    reference_secrets: list[str],
    *,
    label: str,
    section: ScoringSection,
    progress: bool = True,
) -> list[SequenceScore]:
    """One :class:`SequenceScore` per canary under ``model`` (``label`` names the link: base, tuned, ...).

    Every canary is ranked against the same ``reference_secrets`` placed after its own prefix, so members and
    never-inserted references are measured identically.
    """
    from tqdm.auto import tqdm

    splits = [split_tokens(tokenizer, c.prefix, c.secret) for c in canaries.canaries]
    bar = tqdm(total=len(splits), desc=f"score {label}", unit="canary", leave=False, disable=not progress)
    nll: list[float] = []
    ranks: list[int] = []
    for canary, split in zip(canaries.canaries, splits, strict=True):
        prefix_text = canary.prefix
        candidates = [split.secret_ids] + [split_tokens(tokenizer, prefix_text, s).secret_ids for s in reference_secrets]
        bits = candidate_nll_bits(model, split.prefix_ids, candidates, batch_size=section.batch_size)
        nll.append(bits[0])
        ranks.append(rank_against_references(bits[0], bits[1:]))
        bar.update(1)
    bar.close()
    max_new = max(len(s.secret_ids) for s in splits) + section.extraction_extra_tokens
    continuations = greedy_continuations(model, tokenizer, [s.prefix_ids for s in splits], max_new_tokens=max_new,
                                         batch_size=section.batch_size)
    n_refs = len(reference_secrets)
    return [
        SequenceScore(
            canary_id=c.id, model=label, repetitions=c.repetitions, secret_tokens=len(s.secret_ids),
            secret_nll_bits=round(b, 6), rank=r, n_references=n_refs,
            exposure=round(exposure_from_rank(r, n_refs + 1), 6),
            extracted=cont[: len(s.secret_ids)] == s.secret_ids,
        )
        for c, s, b, r, cont in zip(canaries.canaries, splits, nll, ranks, continuations, strict=True)
    ]


def space_bits(canaries: CanarySet) -> float:
    return math.log2(canaries.space.size)
