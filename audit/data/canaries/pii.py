"""Synthetic look-alike personal records: a name in the prefix; an email, a phone and a card-like number as the secret.

Every value is fake by construction and marked as such:

* the record opens with ``[SYNTHETIC TEST RECORD ...]`` (the spec's templates say so);
* emails use the reserved example domains (RFC 2606: ``example.com``, ``.test``, ...);
* phone numbers use the North American 555-0100 .. 555-0199 block reserved for fictional use;
* card-like numbers are 16 digits whose Luhn check digit is deliberately wrong, so no payment network can
  accept one (Luhn, US patent 2,950,048).

The name is drawn independently of the secret, so under the base model a canary's secret and references drawn
from the same generator are exchangeable after its prefix: exposure against sampled references has the usual
null (rank uniform, about 1.44 bits on average).
"""

from __future__ import annotations

import math
from typing import Any

from audit.core.errors import AuditError
from audit.core.rng import SeededStream
from audit.core.schema import SecretSpace
from audit.data.canaries.base import Draft, Draw, GenerationContext, split_template
from audit.data.canaries.params import RESERVED_DOMAINS, PiiParams
from audit.data.canaries.uniqueness import UniquePool

FICTIONAL_PHONE_BLOCK = range(100, 200)  # 555-0100 .. 555-0199


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def luhn_failing_card(rng: SeededStream, prefix: str, length: int = 16) -> str:
    """A card-like number that fails the Luhn check (so it can never be a real card number)."""
    body = prefix + "".join(str(rng.below(10)) for _ in range(length - len(prefix)))
    if luhn_valid(body):
        body = body[:-1] + str((int(body[-1]) + 1) % 10)  # any change of one digit breaks a valid Luhn sum
    return " ".join(body[i : i + 4] for i in range(0, length, 4))


def _check_domains(domains: list[str]) -> None:
    for d in domains:
        if not (d in RESERVED_DOMAINS or d.endswith((".test", ".example", ".invalid")) or d.split(".")[-2:-1] == ["example"]):
            raise AuditError(f"pii spec domain '{d}' is not a reserved example domain (RFC 2606)",
                             fix="use example.com / example.org / example.net or a .test / .example domain")


def pii_generator(params: dict[str, Any], n: int, rng: SeededStream, ctx: GenerationContext, exclude: set[str]) -> Draw:
    """Records ``<template with {name}>`` whose secret is ``<email>, phone <phone>, card <card>``."""
    p = PiiParams.model_validate(params)
    first, last, words = [str(x) for x in p.first_names], [str(x) for x in p.last_names], [str(x) for x in p.email_words]
    domains = [str(x) for x in p.domains]
    _check_domains(domains)
    areas = [str(x) for x in p.area_codes]
    card_prefixes = [str(x) for x in p.card_prefixes]
    templates = [str(t) for t in p.templates]
    contexts = [(t, f"{a} {b}") for t in templates for a in first for b in last]
    if len(contexts) < n:
        raise AuditError(f"pii spec has {len(contexts)} template x name contexts but {n} records are needed",
                         fix="add names or templates to the spec")
    contexts = rng.shuffled(contexts)[:n]
    pool = UniquePool(ngram=p.ngram, max_jaccard=p.max_jaccard, exclude=exclude)
    attempts = 0
    while len(pool.accepted) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise AuditError(f"could not draw {n} distinct pii records", fix="add email_words or raise params.max_jaccard")
        email = f"{rng.choice(words)}.{rng.choice(words)}{rng.below(100):02d}@{rng.choice(domains)}"
        phone = f"+1-{rng.choice(areas)}-555-0{rng.choice(FICTIONAL_PHONE_BLOCK)}"
        card = luhn_failing_card(rng, rng.choice(card_prefixes))
        pool.offer(f"{email}, phone {phone}, card {card}")
    drafts = []
    for (template, name), secret in zip(contexts, pool.accepted, strict=True):
        head, tail = split_template(template.replace("{name}", name))
        drafts.append(Draft(prefix=head, secret=secret, suffix=tail))
    card_bits = (sum(math.log2(10 ** (16 - len(p))) for p in card_prefixes) / len(card_prefixes)
                 + math.log2(len(card_prefixes) * 0.9))
    bits = (2 * math.log2(len(words)) + math.log2(100 * len(domains))          # email
            + math.log2(len(areas) * len(FICTIONAL_PHONE_BLOCK))               # phone
            + card_bits)
    return Draw(drafts=drafts, space=SecretSpace(kind="sampled", bits=round(bits, 3)))
