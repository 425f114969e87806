"""Seeded canary generators.

Every canary is ``prefix + secret + suffix``. A pool of ``members + references`` canaries is drawn first, then a
seeded shuffle assigns each one to a repetition tier or to the never-inserted reference set, so members and
references come from one distribution (the statistical precondition for membership inference; Carlini et al.
2019 draw canaries the same way). IDs are content hashes; the same spec and seed give byte-identical output.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from audit.canaries.spec import CanarySpec
from audit.errors import AuditError, did_you_mean
from audit.rng import SeededStream
from audit.schema import Canary, CanarySet, SecretSpace


@dataclass(frozen=True)
class Draft:
    prefix: str
    secret: str
    suffix: str


Generator = Callable[[dict[str, Any], int, SeededStream], tuple[list[Draft], SecretSpace]]


def _split_template(template: str) -> tuple[str, str]:
    if template.count("{secret}") != 1:
        raise AuditError(f"canary template '{template}' must contain '{{secret}}' exactly once", fix="edit the spec's templates")
    head, _, tail = template.partition("{secret}")
    return head, tail


def random_secrets(space: SecretSpace, n: int, rng: SeededStream, *, exclude: set[str] = frozenset()) -> list[str]:
    """``n`` distinct secrets drawn uniformly from ``space``, none of them in ``exclude``."""
    if n + len(exclude) > space.size:
        raise AuditError(f"cannot draw {n} distinct secrets from a space of {space.size}",
                         fix="use a longer secret or fewer canaries / exposure references")
    seen: set[str] = set(exclude)
    out: list[str] = []
    while len(out) < n:
        secret = space.render([space.alphabet[rng.below(len(space.alphabet))] for _ in range(space.length)])
        if secret not in seen:
            seen.add(secret)
            out.append(secret)
    return out


def digits_generator(params: dict[str, Any], n: int, rng: SeededStream) -> tuple[list[Draft], SecretSpace]:
    """Numeric secrets in a sentence template, e.g. "... the vault code of Ms. Halloway is 481927."

    The space (``alphabet ** length``) is enumerable, so exposure can be computed exactly.
    """
    space = SecretSpace(alphabet=list(params.get("alphabet", "0123456789")), length=int(params.get("length", 6)),
                        separator=str(params.get("separator", "")))
    templates = list(params.get("templates") or ["My PIN is {secret}."])
    names = list(params.get("names") or [""])
    contexts = [(t, nm) for t in templates for nm in names]
    if len(contexts) < n:
        raise AuditError(f"spec has {len(contexts)} distinct template x name contexts but {n} canaries are needed",
                         fix="add templates or names to the spec, or lower members_per_tier / references")
    contexts = rng.shuffled(contexts)[:n]
    secrets = random_secrets(space, n, rng)
    drafts = []
    for (template, name), secret in zip(contexts, secrets, strict=True):
        head, tail = _split_template(template.replace("{name}", name))
        drafts.append(Draft(prefix=head, secret=secret, suffix=tail))
    return drafts, space


GENERATORS: dict[str, Generator] = {"digits": digits_generator}


def canary_id(spec: str, version: int, draft: Draft) -> str:
    raw = f"{spec}\x1f{version}\x1f{draft.prefix}\x1f{draft.secret}\x1f{draft.suffix}".encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_canaries(
    spec: CanarySpec,
    *,
    seed: int,
    tiers: list[int] | None = None,
    members_per_tier: int | None = None,
    references: int | None = None,
) -> CanarySet:
    """Draw the pool for ``spec`` and assign each canary to a tier or to the references (seeded)."""
    tiers = sorted(tiers or spec.tiers)
    members_per_tier = members_per_tier or spec.members_per_tier
    references = references or spec.references
    if spec.generator not in GENERATORS:
        raise AuditError(f"canary spec '{spec.name}' names unknown generator '{spec.generator}'."
                         + did_you_mean(spec.generator, GENERATORS), fix=f"use one of: {', '.join(GENERATORS)}")
    roles = [tier for tier in tiers for _ in range(members_per_tier)] + [0] * references
    pool_rng = SeededStream(seed, f"canaries:{spec.name}:v{spec.version}:pool")
    drafts, space = GENERATORS[spec.generator](spec.params, len(roles), pool_rng)
    roles = SeededStream(seed, f"canaries:{spec.name}:v{spec.version}:roles").shuffled(roles)
    canaries = [
        Canary(id=canary_id(spec.name, spec.version, d), spec=spec.name, prefix=d.prefix, secret=d.secret,
               suffix=d.suffix, repetitions=r)
        for d, r in zip(drafts, roles, strict=True)
    ]
    if len({c.id for c in canaries}) != len(canaries):
        raise AuditError(f"canary spec '{spec.name}' produced duplicate canaries", fix="add templates or names to the spec")
    canaries.sort(key=lambda c: c.id)
    return CanarySet(spec=spec.name, spec_version=spec.version, seed=seed, space=space, canaries=canaries)
