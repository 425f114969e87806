"""Score a canary set under one model: every per-canary number the metrics need, from as few passes as possible.

Per model, for all canaries at once:

1. one teacher-forced pass over each canary text (token log-probs plus full-vocabulary mean/variance): the MIA
   signals (loss, Min-K%, Min-K%++, zlib), the information view (bits) and (n, p) extraction all read it;
2. the Secret Sharer rank against the sampled reference secrets (shared-prefix KV cache), its whole-space estimate
   with a binomial interval, and the skew-normal extrapolation capped at log2|R|: for every member and for the null
   sample of the never-inserted references (``scoring.exposure_null_references``, :func:`ranked_indices`); the other
   references are MIA controls, whose attacks read step 1 only (step 2 is ``scoring.exposure_references`` candidates,
   255 by default, of 6 tokens after each prefix: ~1,300 forward positions per canary, against ~25 for step 1);
3. where the space is enumerable, the tokenization compositional, and the sampled estimate within the node budget,
   the exact rank over the whole space (:mod:`audit.score.exposure_search`);
4. for the canaries of step 2 (members and the null sample): batched greedy decoding from the prefix, and from the
   prefix plus a fraction of the secret, and N samples (each prefix's keys/values computed once for its N samples).

Rows carry ids and numbers, never the secret text.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from audit.core.schema import Canary, CanarySet, ScoringSection, SequenceScore
from audit.metrics.exposure import exposure_extrapolation, exposure_from_rank, rank_against_references, sampled_space_exposure
from audit.metrics.extraction import discoverable_match
from audit.metrics.information import utf8_bits
from audit.metrics.mia import mean_loss, min_k_plus_plus_score, min_k_score, zlib_ratio_score
from audit.metrics.suite import token_view_fields
from audit.score.backend import ScoringBackend
from audit.score.engine import SplitTokens, split_tokens, split_tokens_many
from audit.score.hf_backend import as_backend


def _text_tokens(tokenizer, canary: Canary, split: SplitTokens) -> list[int]:
    """Tokens of the whole canary text whose head is exactly ``prefix_ids + secret_ids`` (else just that head)."""
    head = split.prefix_ids + split.secret_ids
    full = tokenizer(canary.text, add_special_tokens=False)["input_ids"]
    return full if full[: len(head)] == head else head


def _exact(backend: ScoringBackend, tokenizer, canary: Canary, canaries: CanarySet, section: ScoringSection, rank: int,
           n_refs: int, seed: int, bits: list[float] | None = None) -> tuple[str, int | None, int | None]:
    """(status, exact rank, nodes scored) for one canary; see :mod:`audit.score.exposure_search`.

    The pruned walk or the whole trie, whichever is expected to cost less within ``scoring.exact_exposure_budget``
    rows (:func:`~audit.score.exposure_search.choose_exact_method`); status ``exact`` when the walk ranked it,
    ``enumerated`` when the enumeration did (the same exact rank), ``skipped`` when neither fits. The walk's rows are
    expected from the sampled rank, or, given ``bits`` (the canary's then the references' bits, as ranked), from
    the losses (:func:`~audit.score.exposure_search.expected_walk_rows`)."""
    from audit.score.exposure_search import (
        NotCompositionalError,
        choose_exact_method,
        enumerate_rank,
        exact_rank,
        expected_walk_rows,
        parse_secret,
        symbol_tokens,
        trie_rows,
    )

    space = canaries.space
    if not section.exact_exposure:
        return "off", None, None
    if not space.enumerable:
        return "not_enumerable", None, None
    budget = section.exact_exposure_budget
    # the walk's cost grows with the rank, the enumeration's is the trie's:
    # skip when the sampled estimate puts both beyond the budget
    walk_rows = None if bits is None else expected_walk_rows(bits[0], bits[1:], len(space.alphabet), space.length)
    choice = choose_exact_method(rank_estimate=1 + (rank - 1) / n_refs * (space.size - 1), alphabet_size=len(space.alphabet),
                                 length=space.length, budget=budget, walk_rows=walk_rows)
    if choice.method == "skip":
        return "skipped", None, None
    try:
        table = symbol_tokens(tokenizer, canary.prefix, space, canary.secret, seed=seed)
    except NotCompositionalError:
        return "not_compositional", None, None
    secret = parse_secret(space, canary.secret)
    if choice.method == "walk":
        result = exact_rank(backend, table, secret, node_budget=budget)
        if result.status == "exact" or result.nodes_evaluated + trie_rows(len(space.alphabet), space.length) > budget:
            return result.status, result.rank, result.nodes_evaluated
        spent = result.nodes_evaluated  # the walk could not finish (reduced precision) and the whole trie still fits
    else:
        spent = 0
    result = enumerate_rank(backend, table, secret)
    return "enumerated", result.rank, spent + result.nodes_evaluated


def ranked_indices(canaries: CanarySet, section: ScoringSection) -> list[int]:
    """Indices of the canaries whose exposure is measured (steps 2-3): every member, and of the never-inserted
    references the ``scoring.exposure_null_references`` with the smallest ids (all of them when None).

    Ids are keyed hashes of the canary (:func:`audit.data.canaries.generate.canary_id`), unrelated to the member/reference
    draw, so the smallest ids are a uniform random sample of the references, fixed before any model is scored and the
    same for every model of a run. The others are MIA controls only: their attacks read the teacher-forced pass.
    """
    items = canaries.canaries
    refs = sorted((i for i, c in enumerate(items) if c.repetitions == 0), key=lambda i: items[i].id)
    keep = set(refs if section.exposure_null_references is None else refs[: section.exposure_null_references])
    return [i for i, c in enumerate(items) if c.repetitions > 0 or i in keep]


def unranked_row(secret_logprobs) -> dict[str, Any]:
    """The exposure fields of a reference outside the null sample: its secret's bits from the teacher-forced pass,
    no rank (see :func:`ranked_indices`)."""
    return dict(secret_nll_bits=round(-float(np.sum(secret_logprobs)) / math.log(2), 6), rank=None, n_references=None,
                exposure=None, exact_status="unranked")


def exposure_row(scorer: Any, tokenizer: Any, canary: Canary, split: SplitTokens, canaries: CanarySet,
                 reference_secrets: list[str], *, section: ScoringSection, seed: int = 0,
                 on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One canary's exposure fields (step 2-3 of the module docstring): independent of every other canary.

    ``scorer``: a :class:`~audit.score.backend.ScoringBackend` (or a transformers model, scored by today's engine in
    its own dtype). ``on_step``: told what runs next (the progress heartbeat, :mod:`audit.core.progress`)."""
    backend = as_backend(scorer, tokenizer, batch_size=section.batch_size)
    n_refs = len(reference_secrets)
    space_size = canaries.space.size
    candidates = [split.secret_ids] + [r.secret_ids for r in split_tokens_many(tokenizer, canary.prefix, reference_secrets)]
    bits = backend.candidate_bits(split.prefix_ids, candidates)
    rank = rank_against_references(bits[0], bits[1:])
    estimate = sampled_space_exposure(rank, n_refs, space_size)
    extra = exposure_extrapolation([bits[0]], bits[1:], space_size=space_size) if n_refs >= 3 else None
    if on_step is not None:
        on_step("exact rank over the whole secret space")
    status, exact, nodes = _exact(backend, tokenizer, canary, canaries, section, rank, n_refs, seed)
    row: dict[str, Any] = dict(
        secret_nll_bits=round(bits[0], 6), rank=rank, n_references=n_refs,
        exposure=round(exposure_from_rank(rank, n_refs + 1), 6),
        exact_status=status, exact_rank=exact, exact_nodes=nodes,
        exposure_extrapolated=None if extra is None else round(float(extra.exposure[0]), 6),
        extrapolation_capped=None if extra is None else bool(extra.capped[0]),
    )
    if exact is not None:
        value = round(exposure_from_rank(exact, space_size), 6)
        row.update(exposure_method="exact", exposure_space=value, exposure_space_low=value, exposure_space_high=value)
    else:
        row.update(exposure_method="sampled", exposure_space=round(estimate.exposure, 6),
                   exposure_space_low=round(estimate.low, 6), exposure_space_high=round(estimate.high, 6))
    return row


def score_canaries(
    scorer: Any,
    tokenizer: Any,
    canaries: CanarySet,
    reference_secrets: list[str],
    *,
    label: str,
    section: ScoringSection,
    progress: bool = True,
    seed: int = 0,
    exposure_rows: list[dict[str, Any] | None] | None = None,
) -> list[SequenceScore]:
    """One :class:`SequenceScore` per canary under ``scorer`` (``label`` names the link: base, tuned, ...): a
    :class:`~audit.score.backend.ScoringBackend`, or a transformers model scored by today's engine in its own dtype.

    Every canary is ranked against the same ``reference_secrets`` placed after its own prefix, so members and
    never-inserted references are measured identically (every member and the references of :func:`ranked_indices`; the
    other references have no rank). ``seed`` drives sampled extraction. ``exposure_rows``: the canaries'
    :func:`exposure_row` results computed elsewhere (:func:`audit.score.sharded.score_sharded`), in order, None for a
    canary outside :func:`ranked_indices`.
    """
    from tqdm.auto import tqdm

    from audit.core.progress import heartbeat

    with heartbeat(f"score {label}", enabled=progress) as beat:
        return _score_canaries(as_backend(scorer, tokenizer, batch_size=section.batch_size), tokenizer, canaries,
                               reference_secrets, label=label, section=section, progress=progress, seed=seed, beat=beat,
                               tqdm=tqdm, exposure_rows=exposure_rows)


def _score_canaries(backend: ScoringBackend, tokenizer, canaries, reference_secrets, *, label, section, progress, seed, beat,
                    tqdm, exposure_rows):
    items = canaries.canaries
    beat.step(f"one teacher-forced pass over {len(items)} canary texts")
    splits = [split_tokens(tokenizer, c.prefix, c.secret) for c in items]

    # 1. one teacher-forced pass per canary text
    texts = [_text_tokens(tokenizer, c, s) for c, s in zip(items, splits, strict=True)]
    passes = backend.token_logprobs(texts, vocab_stats=True)

    # 2-3. exposure: sampled rank, whole-space estimate, extrapolation, exact walk (or rows scored elsewhere:
    # audit.score.sharded, each process of a distributed run taking a share of the canaries). References outside the
    # null sample (scoring.exposure_null_references) get None here: the teacher-forced pass is all they need.
    if exposure_rows is None:
        ranked = ranked_indices(canaries, section)
        bar = tqdm(total=len(ranked), desc=f"score {label}", unit="canary", leave=False, disable=not progress)
        exposure_rows = [None] * len(items)
        for k, i in enumerate(ranked):
            beat.step(f"canary {k + 1}/{len(ranked)}: ranking against {len(reference_secrets)} references")
            exposure_rows[i] = exposure_row(backend, tokenizer, items[i], splits[i], canaries, reference_secrets,
                                            section=section, seed=seed,
                                            on_step=lambda what, k=k: beat.step(f"canary {k + 1}/{len(ranked)}: {what}"))
            bar.update(1)
            beat.touch()
        bar.close()

    # 4. extraction, where exposure is measured (every member and the null sample; a reference outside it is an MIA
    # control only): greedy from the prefix, greedy from prefix + a fraction of the secret, sampled
    measured = [i for i in range(len(items)) if exposure_rows[i] is not None]
    max_new = max(len(s.secret_ids) for s in splits) + section.extraction_extra_tokens
    beat.step(f"greedy extraction from {len(measured)} prefixes")
    outs = [o[0] for o in backend.generate([splits[i].prefix_ids for i in measured], max_new_tokens=max_new)]
    greedy: list[list[int] | None] = [None] * len(items)
    for i, out in zip(measured, outs, strict=True):
        greedy[i] = out
    from_fraction: list[bool | None] = [None] * len(items)
    if section.extraction_secret_fraction > 0:
        given = [max(1, math.floor(section.extraction_secret_fraction * len(s.secret_ids))) for s in splits]
        eligible = [i for i in measured if len(splits[i].secret_ids) > given[i]]
        if eligible:
            beat.step(f"greedy extraction from {len(eligible)} prefixes plus part of the secret")
            outs = [o[0] for o in backend.generate([splits[i].prefix_ids + splits[i].secret_ids[: given[i]] for i in eligible],
                                                   max_new_tokens=max_new)]
            for i, out in zip(eligible, outs, strict=True):
                rest = splits[i].secret_ids[given[i]:]
                from_fraction[i] = out[: len(rest)] == rest
    sampled: list[int | None] = [None] * len(items)
    if section.sampled_extraction_samples > 0 and measured:
        beat.step(f"sampled extraction, {section.sampled_extraction_samples} samples from each of {len(measured)} prefixes")
        samples = backend.generate([splits[i].prefix_ids for i in measured], samples=section.sampled_extraction_samples,
                                   max_new_tokens=max(len(s.secret_ids) for s in splits), seed=seed,
                                   temperature=section.sampled_extraction_temperature)
        for i, per in zip(measured, samples, strict=True):
            sampled[i] = sum(x[: len(splits[i].secret_ids)] == splits[i].secret_ids for x in per)

    rows = []
    for i, (c, s) in enumerate(zip(items, splits, strict=True)):
        span = passes[i].span(len(s.prefix_ids), len(s.prefix_ids) + len(s.secret_ids))
        match = None if greedy[i] is None else discoverable_match(greedy[i], s.secret_ids)
        exposure = exposure_rows[i] if exposure_rows[i] is not None else unranked_row(span.logprobs)
        rows.append(SequenceScore(
            canary_id=c.id, model=label, repetitions=c.repetitions, secret_tokens=len(s.secret_ids),
            extracted=None if match is None else match.exact, **exposure,
            mia_loss=round(mean_loss(span.logprobs), 6),
            mia_min_k=round(min_k_score(span.logprobs, k=section.mia_k), 6),
            mia_min_k_pp=round(min_k_plus_plus_score(span.logprobs, span.vocab_mean, span.vocab_var, k=section.mia_k), 6),
            mia_zlib=round(zlib_ratio_score(span.logprobs, c.secret), 6),
            extraction_lcp_tokens=None if match is None else match.lcp_tokens,
            extraction_ned=None if match is None else round(match.normalized_edit_distance, 6),
            extracted_from_fraction=from_fraction[i],
            sampled_matches=sampled[i],
            sampled_n=(section.sampled_extraction_samples or None) if sampled[i] is not None else None,
            secret_utf8_bits=utf8_bits(c.secret), text_bits=round(float(passes[i].bits), 6),
            # the whole text's per-token view (text-scope attacks, EZ-MIA): numbers only, the text as its zlib length
            **token_view_fields(passes[i].logprobs, passes[i].top1, passes[i].vocab_mean, passes[i].vocab_var,
                                prefix_tokens=len(s.prefix_ids), text=c.text),
        ))
    return rows


def space_bits(canaries: CanarySet) -> float:
    return float(canaries.space.log2_size)
