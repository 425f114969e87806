"""Canary specs and generators: determinism, uniqueness, randomized roles, fake-by-construction PII, confidentiality."""

from __future__ import annotations

import json
import math
import re

import pytest
from helpers import FakeSampler

from audit.core.errors import AuditError
from audit.core.store import write_jsonl
from audit.data.canaries import (
    GenerationContext,
    generate_canaries,
    load_spec,
    reference_secrets,
    shipped_specs,
    spec_needs_model,
)
from audit.data.canaries.pii import luhn_valid
from audit.data.canaries.uniqueness import SecretScanner, UniquePool, check_secrets_absent, near_duplicate_pairs

OFFLINE_SPECS = ["digits", "words", "pii"]


def test_every_shipped_spec_loads_and_says_whether_it_needs_the_model():
    names = shipped_specs()
    assert {"digits", "words", "pii", "traps", "works"} <= set(names)
    needs = {name: spec_needs_model(load_spec(name)) for name in names}
    assert needs["traps"] and needs["works"] and not needs["digits"] and not needs["words"] and not needs["pii"]


@pytest.mark.parametrize("name", OFFLINE_SPECS)
def test_same_spec_and_seed_give_byte_identical_canaries_jsonl(name, tmp_path):
    paths = []
    for k in range(2):
        canaries = generate_canaries(load_spec(name), seed=11)
        paths.append(tmp_path / f"{k}.jsonl")
        write_jsonl(paths[-1], canaries.canaries)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    other = generate_canaries(load_spec(name), seed=12)
    assert {c.secret for c in other.canaries} != {json.loads(line)["secret"] for line in paths[0].read_text().splitlines()}


@pytest.mark.parametrize("name", OFFLINE_SPECS)
def test_pool_has_the_designed_roles_unique_ids_and_no_near_duplicates(name):
    spec = load_spec(name)
    canaries = generate_canaries(spec, seed=3)
    designed = [t for t in spec.tiers for _ in range(spec.members_per_tier)] + [0] * spec.references
    assert sorted(c.repetitions for c in canaries.canaries) == sorted(designed)
    assert len({c.id for c in canaries.canaries}) == len(canaries.canaries)
    assert len({c.prefix for c in canaries.canaries}) == len(canaries.canaries), "each prefix is unique"
    assert near_duplicate_pairs([c.secret for c in canaries.canaries], ngram=3, max_jaccard=0.6) == []


def test_roles_are_assigned_at_random_independently_of_content():
    """Over many seeds, the canary with the smallest secret is a reference about half the time (6 of 12 roles)."""
    spec = load_spec("digits")
    n_seeds = 200
    as_reference = sum(not min(generate_canaries(spec, seed=s).canaries, key=lambda c: c.secret).is_member
                       for s in range(n_seeds))
    assert 0.38 < as_reference / n_seeds < 0.62


def test_overrides_reach_the_generator_and_change_the_space():
    canaries = generate_canaries(load_spec("digits", {"length": 9}), seed=0)
    assert all(len(c.secret) == 9 for c in canaries.canaries)
    assert canaries.space.size == 10**9
    assert generate_canaries(load_spec("words"), seed=0, tiers=[2, 8], members_per_tier=3, references=4).tiers() == [0, 2, 8]


def test_unknown_spec_and_generator_are_refused_with_a_suggestion(tmp_path):
    with pytest.raises(AuditError, match="Did you mean 'words'"):
        load_spec("wrods")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nversion: 1\ngenerator: digit\n")
    with pytest.raises(AuditError, match="unknown generator 'digit'"):
        generate_canaries(load_spec(str(bad)), seed=0)


@pytest.mark.parametrize("name", ["digits", "words", "pii", "traps", "works"])
def test_every_generator_refuses_an_unknown_param_by_name_with_a_suggestion(name):
    key = {"digits": "lenght", "words": "lenght", "pii": "domain", "traps": "temprature", "works": "source"}[name]
    with pytest.raises(AuditError) as err:
        load_spec(name, {key: 1})
    assert f"unknown param '{key}'" in err.value.problem and "Did you mean" in err.value.problem
    assert f"valid params of the {name} generator" in err.value.fix


def test_generator_params_are_typed_and_their_defaults_visible():
    from audit.data.canaries.params import DigitsParams, TrapsParams, parse_params

    assert parse_params("digits", {}, spec="digits") == DigitsParams(length=6, alphabet="0123456789", ngram=3)
    assert TrapsParams().ppl_band == [1.0, 100.0] and TrapsParams().max_jaccard == 0.5
    with pytest.raises(AuditError, match="param 'length'"):
        load_spec("digits", {"length": True})  # a bool is not a length (YAML `length: yes`)
    with pytest.raises(AuditError, match="ppl_band must be"):
        load_spec("traps", {"ppl_band": [100, 10]})


def test_pii_records_are_fake_by_construction():
    canaries = generate_canaries(load_spec("pii"), seed=5, members_per_tier=10, references=20)
    for c in canaries.canaries:
        assert "SYNTHETIC TEST RECORD" in c.prefix
        email, phone, card = re.fullmatch(r"(\S+@\S+), phone (\S+), card ([\d ]+)", c.secret).groups()
        assert email.split("@")[1] in {"example.com", "example.org", "example.net", "mail.test", "post.example"}
        assert re.fullmatch(r"\+1-\d{3}-555-01\d\d", phone)
        digits = card.replace(" ", "")
        assert len(digits) == 16 and not luhn_valid(digits)
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    with pytest.raises(AuditError, match="reserved example domain"):
        generate_canaries(load_spec("pii", {"domains": ["gmail.com"]}), seed=0)


@pytest.mark.parametrize("name", OFFLINE_SPECS)
def test_reference_secrets_come_from_the_space_and_exclude_every_canary(name):
    spec = load_spec(name)
    canaries = generate_canaries(spec, seed=1)
    refs = reference_secrets(spec, canaries, n=100, seed=1)
    assert len(refs) == len(set(refs)) == 100
    assert not set(refs) & {c.secret for c in canaries.canaries}
    assert refs == reference_secrets(spec, canaries, n=100, seed=1)
    if canaries.space.enumerable:
        alphabet = set(canaries.space.alphabet)
        assert all(set(r.split(canaries.space.separator) if canaries.space.separator else r) <= alphabet for r in refs)
    else:
        assert canaries.space.bits and canaries.space.bits > 40


def test_near_duplicates_are_refused_and_detected():
    pool = UniquePool(ngram=3, max_jaccard=0.5)
    assert pool.offer("amber river stone cloud")
    assert not pool.offer("amber river stone cloud")          # exact duplicate
    assert not pool.offer("amber river stone clouds")         # near duplicate
    assert pool.offer("quartz tundra velvet pixel")
    assert near_duplicate_pairs(["481927", "481920", "735102"], ngram=3, max_jaccard=0.5) == [(0, 1, 0.6)]


def test_a_secret_already_in_the_corpus_is_refused_without_printing_it():
    scanner = SecretScanner({"id-a": "481927", "id-b": "amber river"})
    check_secrets_absent(scanner, 0, ["nothing to see", "code 48192 7"], source="c")
    with pytest.raises(AuditError) as err:
        check_secrets_absent(scanner, 3, ["the amber river flows"], source="c")
    assert "id-b" in str(err.value) and "record 3" in str(err.value) and "amber river" not in str(err.value)


def test_traps_keep_only_samples_inside_the_perplexity_band():
    spec = load_spec("traps", {"ppl_band": [10, 100]})
    ctx = GenerationContext(sampler=FakeSampler())
    canaries = generate_canaries(spec, seed=0, context=ctx)
    assert canaries.space.kind == "sampled"
    assert abs(canaries.space.bits - 24 * math.log2(50.0)) < 1e-3  # only the ppl-50 samples were kept
    assert all(re.fullmatch(r"(Archive record|Field note|Log entry) [A-Z2-9]{5}: ", c.prefix) for c in canaries.canaries)
    refs = reference_secrets(spec, canaries, n=20, seed=0, context=ctx)
    assert len(refs) == 20 and not set(refs) & {c.secret for c in canaries.canaries}
    with pytest.raises(AuditError, match="perplexity band"):
        generate_canaries(load_spec("traps", {"ppl_band": [1000, 2000], "max_rounds": 2}), seed=0, context=ctx)
    with pytest.raises(AuditError, match="no model was given"):
        generate_canaries(spec, seed=0)


def test_traps_from_the_tiny_model_are_reproducible(tiny_model):
    from audit.data.canaries.sampling import ModelSampler

    model, tokenizer = tiny_model
    spec = load_spec("traps", {"ppl_band": [1, 1e6], "retokenize": False, "secret_tokens": 8, "batch": 16})
    runs = [generate_canaries(spec, seed=4, context=GenerationContext(tokenizer=tokenizer, sampler=ModelSampler(
        model, tokenizer, fingerprint="tiny"))) for _ in range(2)]
    assert runs[0].model_dump_json() == runs[1].model_dump_json()
    assert len(runs[0].canaries) == 12


def test_canaries_command_hides_secrets_unless_revealed(capsys, tmp_path):
    from audit.cli import main

    assert main(["canaries", "digits", "--model", "tiny-llama", "--seed", "2", "--out", str(tmp_path / "c.jsonl")]) == 0
    hidden = capsys.readouterr().out
    secrets = [json.loads(line)["secret"] for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(secrets) == 12 and not any(s in hidden for s in secrets)
    assert "<hidden: 6 chars" in hidden and "--reveal" in hidden
    assert main(["canaries", "digits", "--model", "tiny-llama", "--seed", "2", "--reveal"]) == 0
    shown = capsys.readouterr().out
    assert all(s in shown for s in secrets)


def test_canary_inject_works_and_preflight_modules_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys\n"
            "import audit.data.canaries, audit.data.inject, audit.data.preflight, audit.data.works\n"
            "import audit.data.works.information, audit.data.corpus\n"
            "from audit.data.canaries import generate_canaries, load_spec\n"
            "generate_canaries(load_spec('pii'), seed=0)\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
