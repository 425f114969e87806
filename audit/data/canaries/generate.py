"""Seeded canary generation: one pool per spec, roles assigned at random, IDs from content.

Every canary is ``prefix + secret + suffix``. A pool of ``members + references`` canaries is drawn first, then a
seeded shuffle assigns each one to a repetition tier or to the never-inserted reference set, so members and
references come from one distribution (the statistical precondition for membership inference; Carlini et al.
2019 draw canaries the same way).

Keyed (:mod:`audit.core.keys`): every draw (pool, roles, exposure references) comes from a :class:`SeededStream` keyed
with the audit key, and ids are HMAC-SHA256 under it, so the seed, which is logged with the recipe, gives nothing
without the key, and an id checks a guessed secret only for the key holder. The same spec, seed and key give
byte-identical output (for the model-sampled specs, on the same machine and library versions); another key
gives other secrets. ``key=None`` is the unkeyed draw of runs written before the audit key (sha256 streams,
``sha256(spec|version|prefix|secret|suffix)`` ids): kept only so those run directories resume and report.

Generators (one per file): ``digits`` and ``words`` (:mod:`.templated`), ``pii`` (:mod:`.pii`), ``traps``
(:mod:`.traps`, needs the base model), ``works`` (:mod:`.works`, the synthetic source needs the base model),
``rare_tokens`` and ``bigram`` (:mod:`.tokens`, need the base model's tokenizer), ``new_tokens`` (:mod:`.tokens`,
tokens added to the vocabulary).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from audit.core.errors import AuditError, did_you_mean
from audit.core.rng import SeededStream
from audit.core.schema import Canary, CanarySet, WorkExcerpt
from audit.data.canaries.base import CanaryGenerator, Draft, GenerationContext, random_secrets
from audit.data.canaries.params import parse_params
from audit.data.canaries.pii import pii_generator
from audit.data.canaries.spec import CanarySpec
from audit.data.canaries.templated import digits_generator, words_generator
from audit.data.canaries.tokens import (
    bigram_generator,
    new_tokens_added,
    new_tokens_generator,
    rare_tokens_generator,
    tokens_need_model,
)
from audit.data.canaries.traps import traps_generator, traps_need_model
from audit.data.canaries.uniqueness import raise_on_near_duplicates
from audit.data.canaries.works import works_generator, works_need_model

if TYPE_CHECKING:
    from audit.core.keys import AuditKey

GENERATORS: dict[str, CanaryGenerator] = {
    "digits": CanaryGenerator(digits_generator),
    "words": CanaryGenerator(words_generator),
    "pii": CanaryGenerator(pii_generator),
    "traps": CanaryGenerator(traps_generator, needs_model=traps_need_model),
    "works": CanaryGenerator(works_generator, needs_model=works_need_model),
    "rare_tokens": CanaryGenerator(rare_tokens_generator, needs_model=tokens_need_model),
    "bigram": CanaryGenerator(bigram_generator, needs_model=tokens_need_model),
    "new_tokens": CanaryGenerator(new_tokens_generator, adds_tokens=new_tokens_added),
}


def generator_of(spec: CanarySpec) -> CanaryGenerator:
    if spec.generator not in GENERATORS:
        raise AuditError(f"canary spec '{spec.name}' names unknown generator '{spec.generator}'."
                         + did_you_mean(spec.generator, GENERATORS), fix=f"use one of: {', '.join(GENERATORS)}")
    return GENERATORS[spec.generator]


def spec_needs_model(spec: CanarySpec) -> bool:
    """True when drawing this spec samples from the base model (traps, synthetic works)."""
    return generator_of(spec).needs_model(spec.params)


def added_tokens(spec: CanarySpec) -> list[str]:
    """Tokens the spec adds to the base model's vocabulary before anything is tokenized (``new_tokens``), else []."""
    return generator_of(spec).adds_tokens(spec.params)


def canary_id(spec: str, version: int, draft: Draft, key: AuditKey | None = None) -> str:
    """16 hex digits of HMAC-SHA256(key, spec|version|prefix|secret|suffix); unkeyed (old runs): of plain sha256."""
    if key is not None:
        return key.digest("canary id", spec, str(version), draft.prefix, draft.secret, draft.suffix)[:16]
    raw = f"{spec}\x1f{version}\x1f{draft.prefix}\x1f{draft.secret}\x1f{draft.suffix}".encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def _stream(seed: int, purpose: str, key: AuditKey | None) -> SeededStream:
    return SeededStream(seed, purpose, key=None if key is None else key.secret)


def check_ids(canaries: CanarySet, key: AuditKey | None) -> None:
    """Refuse a set whose ids are not its rows' keyed ids under ``key`` (an edited secret, or another key's set).

    The set hash of a keyed set leaves the secrets out (:meth:`CanarySet.sha256`): this is the check that binds them.
    """
    if key is None or canaries.key_id is None:
        return
    if canaries.key_id != key.id:
        raise AuditError(f"the canary set was drawn under audit key {canaries.key_id}, the key in use is {key.id} ({key.source})",
                         fix="use the key that drew it ($CANARY_AUDIT_KEY_FILE or canaries.key_file)")
    for c in canaries.canaries:
        if canary_id(c.spec, canaries.spec_version, Draft(prefix=c.prefix, secret=c.secret, suffix=c.suffix), key) != c.id:
            raise AuditError(f"canary {c.id} does not hold the secret its id was made from (canaries.jsonl was edited)",
                             fix="use an unmodified run directory")


def generate_canaries(
    spec: CanarySpec,
    *,
    seed: int,
    tiers: list[int] | None = None,
    members_per_tier: int | None = None,
    references: int | None = None,
    context: GenerationContext | None = None,
    key: AuditKey | None = None,
    inclusion: str = "split",
) -> CanarySet:
    """Draw the pool for ``spec`` and assign each canary to a tier or to the references (seeded and keyed, per group).

    ``key``: the audit key (:func:`audit.core.keys.resolve_key`); every audit passes one. None: the unkeyed draw of old runs.
    ``inclusion``: ``split`` (exactly ``members_per_tier`` per tier and ``references``, in a random order) or ``coin``
    (each of the same pool's canaries is a member by its own fair coin, its tier uniform among ``tiers``: the
    independent inclusion the one-run eps bounds of :mod:`audit.metrics.privacy` assume; counts vary around those).
    """
    tiers = sorted(tiers or spec.tiers)
    members_per_tier = members_per_tier or spec.members_per_tier
    references = references or spec.references
    generator = generator_of(spec)
    ctx = context or GenerationContext()
    ctx.seed, ctx.key = seed, key
    roles = [tier for tier in tiers for _ in range(members_per_tier)] + [0] * references
    pool_rng = _stream(seed, f"canaries:{spec.name}:v{spec.version}:pool", key)
    draw = generator.draw(spec.params, len(roles), pool_rng, ctx, set())

    groups: dict[str, list[Draft]] = {}
    for d in draw.drafts:
        groups.setdefault(d.group, []).append(d)
    canaries: list[Canary] = []
    excerpts: list[WorkExcerpt] = []
    for group, drafts in groups.items():
        if len(drafts) != len(roles):
            raise AuditError(f"canary spec '{spec.name}'{f' source {group}' if group else ''}: drew {len(drafts)} "
                             f"of the {len(roles)} canaries needed", fix="use a larger source or fewer canaries")
        purpose = f"canaries:{spec.name}:v{spec.version}:roles" + (f":{group}" if group else "")
        if inclusion == "coin":
            coin = _stream(seed, purpose + ":coin", key)
            assigned = [tiers[coin.below(len(tiers))] if coin.below(2) else 0 for _ in roles]
            if 0 not in assigned or set(assigned) == {0}:  # 2^(1-n) for n canaries: only tiny pools
                raise AuditError(f"canary spec '{spec.name}': the fair coins of {len(roles)} canaries made them all "
                                 f"{'references' if set(assigned) == {0} else 'members'}",
                                 fix="use more canaries (members_per_tier + references >= 20) or another seed")
        elif inclusion == "split":
            assigned = _stream(seed, purpose, key).shuffled(roles)
        else:
            raise AuditError(f"unknown canary inclusion {inclusion!r}", fix="use canaries.inclusion=split or coin")
        for d, r in zip(drafts, assigned, strict=True):
            c = Canary(id=canary_id(spec.name, spec.version, d, key), spec=spec.name, prefix=d.prefix, secret=d.secret,
                       suffix=d.suffix, repetitions=r, work=d.work)
            canaries.append(c)
            if d.work is not None and d.excerpt is not None:
                excerpts.append(WorkExcerpt(canary_id=c.id, work_id=d.work, start=d.excerpt[0], end=d.excerpt[1],
                                            n_tokens=d.excerpt[2]))
    if len({c.id for c in canaries}) != len(canaries):
        raise AuditError(f"canary spec '{spec.name}' produced duplicate canaries", fix="add templates or names to the spec")
    canaries.sort(key=lambda c: c.id)
    params = parse_params(spec.generator, spec.params, spec=spec.name)  # the generator's own near-duplicate settings
    raise_on_near_duplicates([c.secret for c in canaries], [c.id for c in canaries], ngram=params.ngram,
                             max_jaccard=params.max_jaccard, spec=spec.name)
    used_works = {c.work for c in canaries if c.work}
    works = sorted((w for w in draw.works if w.id in used_works), key=lambda w: (w.source, w.title, w.id))
    return CanarySet(key_id=None if key is None else key.id, spec=spec.name, spec_version=spec.version, seed=seed,
                     space=draw.space, canaries=canaries,
                     works=list({w.id: w for w in works}.values()), excerpts=sorted(excerpts, key=lambda e: e.canary_id))


def reference_secrets(
    spec: CanarySpec,
    canaries: CanarySet,
    *,
    n: int,
    seed: int,
    context: GenerationContext | None = None,
    key: AuditKey | None = None,
) -> list[str]:
    """Secrets the exposure rank compares each canary against, from the canaries' own distribution (keyed like them).

    Product spaces (digits, words): ``n`` uniform draws from the space. Sampled spaces (pii, traps, works): ``n``
    fresh draws from the generator itself (for works, excerpts that overlap no canary), best effort where a source
    runs out. Never a canary's own secret.
    """
    taken = {c.secret for c in canaries.canaries}
    if canaries.space.enumerable:
        return random_secrets(canaries.space, n, _stream(seed, "exposure:references", key), exclude=taken)
    ctx = context or GenerationContext()
    ctx.seed, ctx.key = seed, key
    rng = _stream(seed, f"exposure:references:{spec.name}:v{spec.version}", key)
    draw = generator_of(spec).draw(spec.params, n, rng, ctx, taken)
    secrets = rng.shuffled([d.secret for d in draw.drafts])
    return secrets[:n]


def describe(canaries: CanarySet) -> dict[str, Any]:
    """Counts, hashes and the key id for reports and logs: never secret text, nothing a guess can be checked against."""
    return {**({"key_id": canaries.key_id} if canaries.key_id else {}), "spec": canaries.spec,
            "spec_version": canaries.spec_version, "members": len(canaries.members()),
            "references": len(canaries.references()), "tiers": sorted({c.repetitions for c in canaries.members()}),
            "canary_set_sha256": canaries.sha256(), "space": canaries.space.kind,
            "space_bits": round(canaries.space.log2_size, 3), "works": len(canaries.works)}
