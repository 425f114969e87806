"""Attacks that must fail: recover canary secrets from what a reader of MLflow, the report or the run directory's
shared files gets (issue 12 section 1).

The reader has the recipe with its seed (MLflow params), the public spec (``canaries/digits.yaml``: templates,
names, the 10^6 six-digit codes), every canary id and prefix (manifest.json, scores.jsonl, token_view.json), the
canary-set hash, the manifest hash and the dataset digests (manifest.json, MLflow tags and dataset digest), the
key id. Each attack is run twice: as the reader (no key: it must recover nothing, though the true secret is among
its guesses) and with the audit key (it must recover every secret), so a test fails when the secrets become
recoverable again, and cannot pass because the attack itself is broken.
"""

from __future__ import annotations

import hashlib
import hmac
import re

import pytest

from audit.core.config import load_recipe
from audit.core.keys import AuditKey, resolve_key
from audit.core.schema import sha256_json
from audit.data.canaries import generate_canaries, load_spec, reference_secrets
from audit.data.canaries.base import Draft
from audit.data.canaries.generate import canary_id
from audit.data.inject import fingerprint_records

CODES = [f"{i:06d}" for i in range(10**6)]


@pytest.fixture(scope="module")
def audit_key() -> AuditKey:
    return resolve_key()  # the fixed test key of tests/conftest.py


@pytest.fixture(scope="module")
def truth(tiny_model_dir, audit_key):
    from audit.data.ground_truth import load_tokenizer, prepare_ground_truth

    return prepare_ground_truth(load_recipe("tiny/lora_cpu"), tokenizer=load_tokenizer(tiny_model_dir), key=audit_key)


def _sample(true: str, n: int, seed: int) -> list[str]:
    """``n`` guesses from the digit space, the true secret among them (so a working check must find it)."""
    import random

    picks = random.Random(seed).sample(CODES, n)
    return sorted({*picks, true})


def test_regenerating_from_the_logged_recipe_and_seed_recovers_no_secret(truth, audit_key):
    recipe = load_recipe("tiny/lora_cpu")
    spec = load_spec(recipe.canaries.spec, recipe.canaries.params)
    secrets = {c.secret for c in truth.canaries.canaries}

    def draw(key):
        cs = generate_canaries(spec, seed=recipe.seed, key=key)
        return {c.secret for c in cs.canaries} | set(reference_secrets(spec, cs, n=255, seed=recipe.seed, key=key))

    assert not draw(None) & secrets  # the seed alone (what `audit inject RECIPE` did)
    assert not draw(AuditKey(b"\x00" * 32, source="guess")) & secrets  # a guessed key
    assert draw(audit_key) >= secrets  # control: with the key, every secret


def test_enumerating_the_whole_digit_space_against_a_logged_id_and_prefix_recovers_nothing(truth, audit_key):
    """The issue's attack on token_view.json (id + prefix of the top 16x canary): 10^6 codes, old id formula."""
    top = max(truth.canaries.members(), key=lambda c: (c.repetitions, c.id))
    head = f"{top.spec}\x1f1\x1f{top.prefix}\x1f".encode()
    tail = f"\x1f{top.suffix}".encode()
    plain, keyed = hashlib.sha256(head), hmac.new(audit_key.secret, b"\x1f".join([b"canary id", head]), hashlib.sha256)

    def found(h0) -> list[str]:
        hits = []
        for code in CODES:
            h = h0.copy()
            h.update(code.encode() + tail)
            if h.hexdigest()[:16] == top.id:
                hits.append(code)
        return hits

    assert found(plain) == []
    assert found(keyed) == [top.secret]  # control: the same enumeration under the key finds it


def test_no_logged_id_checks_a_guess_without_the_key(truth, audit_key):
    """Every canary (members and references), a sample of the space with its true secret in it."""
    for i, c in enumerate(truth.canaries.canaries):
        guesses = _sample(c.secret, 2000, seed=i)
        plain = [g for g in guesses if hashlib.sha256(f"{c.spec}\x1f1\x1f{c.prefix}\x1f{g}\x1f{c.suffix}".encode())
                 .hexdigest()[:16] == c.id]
        keyed = [g for g in guesses if canary_id(c.spec, 1, Draft(prefix=c.prefix, secret=g, suffix=c.suffix), audit_key) == c.id]
        assert plain == [] and keyed == [c.secret], c.id


def test_the_logged_set_hash_is_no_function_of_a_secret(truth):
    """Given every secret but one (more than any reader has), the set hash tells the last one's guesses apart not at all."""
    canaries = truth.canaries
    logged = canaries.sha256()  # manifest.json, report.json, MLflow tag canary_audit.canary_set_sha256
    target = canaries.members()[0]
    plain_hits, same = [], 0
    for guess in _sample(target.secret, 500, seed=1):
        rows = [c.model_copy(update={"secret": guess}) if c.id == target.id else c for c in canaries.canaries]
        candidate = canaries.model_copy(update={"canaries": rows})
        same += candidate.sha256() == logged
        if sha256_json(candidate.model_dump(mode="json")) == logged:  # the old formula, secrets included
            plain_hits.append(guess)
    assert plain_hits == []
    assert same == 501  # every guess gives the logged hash: it carries nothing about the secret (the keyed id does)


def test_the_logged_dataset_digest_checks_a_guess_only_with_the_key(truth, audit_key):
    """manifest.dataset_after (MLflow dataset digest and tag): the reader rebuilds the planted records from the public
    corpus and the placements with a guessed secret; with one member (or short secrets) a plain digest would fall."""
    records, logged = truth.injection.records, truth.injection.manifest.dataset_after
    target = truth.canaries.members()[0]
    carriers = {p.record_index for p in truth.injection.manifest.placements}
    others = {c.secret for c in truth.canaries.members()} - {target.secret}
    plain, keyed = [], []
    for guess in _sample(target.secret, 300, seed=2):
        if guess in others:
            continue
        rebuilt = [{**r, "text": r["text"].replace(target.secret, guess)} if i in carriers else r for i, r in enumerate(records)]
        if fingerprint_records(rebuilt) == logged:
            plain.append(guess)
        if fingerprint_records(rebuilt, key=audit_key.secret) == logged:
            keyed.append(guess)
    assert plain == [] and keyed == [target.secret]


def test_audit_canaries_without_reveal_prints_nothing_a_lookup_table_inverts(tiny_model_dir, audit_key, capsys):
    """A sha256 prefix was once shown: a table over the 10^6 codes turned it back into every secret. Now: length only."""
    from audit.cli import main

    assert main(["canaries", "digits", "--model", "tiny-llama"]) == 0
    shown = capsys.readouterr().out
    assert main(["canaries", "digits", "--model", "tiny-llama", "--reveal"]) == 0
    revealed = capsys.readouterr().out
    secrets = {c.secret for c in generate_canaries(load_spec("digits"), seed=0, key=audit_key).canaries}
    assert all(s in revealed for s in secrets) and not [s for s in secrets if s in shown]
    assert shown.count("<hidden: 6 chars>") == 12 and f"audit key {audit_key.id}" in shown
    assert audit_key.secret.hex() not in shown + revealed

    def lookup(text: str) -> set[str]:
        hexes = set(re.findall(r"[0-9a-f]{8,64}", text))
        lengths = {len(h) for h in hexes}
        hits = set()
        for code in CODES:
            digest = hashlib.sha256(code.encode()).hexdigest()
            if any(digest[:n] in hexes for n in lengths):
                hits.add(code)
        return hits

    assert lookup(shown) == set()
    old = "".join(f"<hidden: 6 chars, sha256 {hashlib.sha256(s.encode()).hexdigest()[:12]}>\n" for s in secrets)
    assert lookup(old) == secrets  # control: the old display falls to the same table
