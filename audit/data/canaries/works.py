"""Excerpts of sample works as canaries: the first ``prefix_tokens`` tokens are the prefix, the rest the secret.

Each source in ``params.sources`` is its own group: it gets the spec's full design (every tier and the
references), so the report can compare famous public-domain works with synthetic ones on equal footing.
Excerpt starts are uniform over a source's characters (longer works get more excerpts), never overlap, and are
near-duplicate checked. This is the discoverable-extraction setup (a k-token prefix, the true continuation);
unlike the random-secret specs, the base model can favour an excerpt's own continuation over other excerpts after
its prefix, so judge members against the held-out (reference) excerpts, not against the 1.44-bit null.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

from audit.core.errors import AuditError
from audit.core.rng import SeededStream
from audit.core.schema import SecretSpace
from audit.data.canaries.base import Draft, Draw, GenerationContext
from audit.data.canaries.params import WorksParams
from audit.data.canaries.uniqueness import UniquePool
from audit.data.works import Work, load_source
from audit.data.works.excerpts import cut_excerpt


def _works_of(source: str, params: dict[str, Any], ctx: GenerationContext) -> list[Work]:
    key = f"works:{source}"
    if key not in ctx.memo:
        synthetic = WorksParams.model_validate(params).synthetic
        # keyed: without the key nobody regenerates the synthetic works from the logged seed and base model
        seed = SeededStream(ctx.seed, "works:synthetic", key=None if ctx.key is None else ctx.key.secret).below(2**31)
        works = load_source(source, sampler=ctx.sampler, synthetic=synthetic, seed=seed, progress=ctx.progress)
        if not works:
            raise AuditError(f"works source '{source}' holds no works", fix="check the source")
        ctx.memo[key] = works
    return ctx.memo[key]


def works_generator(params: dict[str, Any], n: int, rng: SeededStream, ctx: GenerationContext, exclude: set[str]) -> Draw:
    p = WorksParams.model_validate(params)
    sources = [str(s) for s in p.sources]
    n_tokens, prefix_tokens = p.excerpt_tokens, p.prefix_tokens
    if prefix_tokens >= n_tokens:
        raise AuditError(f"works spec: prefix_tokens ({prefix_tokens}) must be below excerpt_tokens ({n_tokens})",
                         fix="lower params.prefix_tokens or raise params.excerpt_tokens")
    pool = UniquePool(ngram=p.ngram, max_jaccard=p.max_jaccard, exclude=exclude)
    # Spans already used in this context (the canary draw, before the exposure-reference draw) stay unavailable.
    used: dict[str, list[tuple[int, int]]] = ctx.memo.setdefault("works:used_spans", {})
    drafts: list[Draft] = []
    all_works: list[Work] = []
    total_chars = 0
    for source in sources:
        works = _works_of(source, params, ctx)
        all_works += works
        for w in works:
            for secret in exclude:
                at = w.text.find(secret)
                if at >= 0:
                    used.setdefault(w.id, []).append((at, at + len(secret)))
        cumulative = []
        acc = 0
        for w in works:
            acc += len(w.text)
            cumulative.append(acc)
        total_chars += acc
        got = misses = 0
        while got < n and misses < 300:  # 300 misses in a row: the source is full, stop early
            misses += 1
            r = rng.below(acc)
            wi = bisect.bisect_right(cumulative, r)
            work = works[wi]
            at = r - (cumulative[wi] - len(work.text))
            if any(a <= at < b for a, b in used.get(work.id, [])):
                continue
            ex = cut_excerpt(work.text, at, n_tokens=n_tokens,
                             prefix_tokens=prefix_tokens, tokenizer=ctx.tokenizer)
            if ex is None or any(ex.start < b and a < ex.end for a, b in used.get(work.id, [])):
                continue
            secret = work.text[ex.prefix_end : ex.end]
            if not pool.offer(secret):
                continue
            used.setdefault(work.id, []).append((ex.start, ex.end))
            misses = 0
            drafts.append(Draft(prefix=work.text[ex.start : ex.prefix_end], secret=secret, group=source, work=work.id,
                                excerpt=(ex.start, ex.end, ex.n_tokens)))
            got += 1
    # log2 of the number of possible excerpt starts: how many excerpts the pool was drawn from.
    space = SecretSpace(kind="sampled", bits=round(math.log2(max(2, total_chars)), 3))
    return Draw(drafts=drafts, space=space, works=[w.provenance for w in all_works])


def works_need_model(params: dict[str, Any]) -> bool:
    return "synthetic" in [str(s) for s in params.get("sources") or []]
