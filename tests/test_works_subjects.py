"""Whole works as audit subjects (audit.data.works.subjects): the keyed member/held-out draw per source, chunks that fit
max_length, every copy planted and recorded, canary placements moved with their records, corpus records kept or
taken out, and the pre-flight over every planted chunk. Offline: folder works made in tmp, a fake sampler."""

from __future__ import annotations

import hashlib

import pytest
from helpers import make_folder

from audit.core.config import load_recipe
from audit.core.errors import AuditError
from audit.core.keys import AuditKey
from audit.data.ground_truth import load_tokenizer, prepare_ground_truth
from audit.data.works.subjects import chunk_text, cut_to_tokens, token_ids

KEY = AuditKey(secret=bytes.fromhex("5a" * 32), source="test")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def recipe(*overrides):
    return load_recipe("tiny/lora_cpu", ["corpus.builtin_records=40", "canaries.tiers=[2]", "canaries.members_per_tier=1",
                                         "canaries.references=2", *overrides])


def folders(tmp_path, n=2):
    return [make_folder(tmp_path / f"f{k}", first=2 * k) for k in range(n)]


def test_chunks_cover_the_text_exactly_and_fit_max_length(tokenizer):
    from audit.data.preflight import record_tokens

    text = "The lighthouse keeper counted 1234 ships in the long grey evenings of autumn. " * 12
    chunks = chunk_text(text, tokenizer, max_length=24)
    assert "".join(text[c.start : c.end] for c in chunks) == text
    assert all(record_tokens(text[c.start : c.end], tokenizer) <= 24 for c in chunks)
    assert sum(c.n_tokens for c in chunks) == len(token_ids(text, tokenizer))
    cut = cut_to_tokens(text, tokenizer, 30)
    assert text.startswith(cut) and 29 <= len(token_ids(cut, tokenizer)) <= 31
    assert cut_to_tokens("short text", tokenizer, 30) == "short text"


def test_works_are_drawn_per_source_planted_in_chunks_and_recorded(tmp_path, tokenizer):
    a, b = make_folder(tmp_path / "a"), make_folder(tmp_path / "b", first=2)
    r = recipe(f"works={{sources: ['folder:{a}', 'folder:{b}'], per_source: 2, copies: 3, prefix_tokens: 8, "
               "suffix_tokens: 8, stride: 8, max_tokens: 200}")
    truth = prepare_ground_truth(r, tokenizer=tokenizer, key=KEY)
    plan, manifest = truth.works, truth.injection.manifest
    assert [(s.source.split("/")[-1], s.role) for s in plan.subjects] == [("a", "member"), ("a", "held_out"),
                                                                          ("b", "member"), ("b", "held_out")]
    assert manifest.work_subjects == plan.subjects
    assert [w.id for w in manifest.subject_works] == [s.work_id for s in plan.subjects]
    records = truth.injection.records
    for s in plan.subjects:
        text = plan.texts[s.work_id]
        assert 195 <= s.n_tokens <= 205 and s.n_chars == len(text)
        copies = [p for p in manifest.work_placements if p.work_id == s.work_id]
        if s.role == "held_out":
            assert not copies and not s.chunks and s.copies == 0
            assert not any(text[:40] in rec["text"] for rec in records)  # never planted
            continue
        assert len(copies) == 3 * len(s.chunks) and len(s.chunks) >= 4  # 200 tokens in pieces of <= 64
        for p in copies:
            ch = s.chunks[p.chunk]
            assert records[p.record_index]["text"] == text[ch.start : ch.end]
    canaries = {c.id: c for c in truth.canaries.canaries}
    for p in manifest.placements:  # canary placements moved with their records
        assert records[p.record_index]["text"] == canaries[p.canary_id].text
    assert manifest.dataset_after.n_records == len(records) == 40 + 2 + sum(3 * len(s.chunks) for s in plan.subjects)
    assert truth.preflight.passed and truth.preflight.placements_checked == 2 + len(manifest.work_placements)
    again = prepare_ground_truth(r, tokenizer=tokenizer, key=KEY)
    assert again.injection.manifest.model_dump_json() == manifest.model_dump_json()  # deterministic
    other = prepare_ground_truth(r, tokenizer=tokenizer, key=AuditKey(secret=bytes(32), source="other"))
    assert other.injection.manifest.work_placements != manifest.work_placements  # keyed


def test_the_role_draw_is_keyed_and_balanced_per_source(tmp_path, tokenizer):
    from helpers import story

    root = tmp_path / "many"
    root.mkdir()
    entries = []
    import yaml

    for k in range(6):
        text = story(k, n=12)
        (root / f"s{k}.txt").write_text(text)
        digest = hashlib.sha256(text.encode()).hexdigest()
        entries.append({"file": f"s{k}.txt", "title": f"S{k}", "license": "CC0-1.0", "sha256": digest})
    (root / "works.yaml").write_text(yaml.safe_dump({"works": entries}))
    r = recipe(f"works={{sources: ['folder:{root}'], per_source: 6, prefix_tokens: 8, suffix_tokens: 8, stride: 8}}")
    roles = {}
    for secret in (bytes(32), bytes([1] * 32), bytes([2] * 32)):
        plan = prepare_ground_truth(r, tokenizer=tokenizer, key=AuditKey(secret=secret, source="t")).works
        assert sorted(s.role for s in plan.subjects) == ["held_out"] * 3 + ["member"] * 3
        roles[secret] = frozenset(s.work_id for s in plan.subjects if s.role == "member")
    assert len(set(roles.values())) > 1  # the key decides which works are members


def test_corpus_records_stay_as_members_and_leave_as_held_out(tokenizer):
    r = recipe("works={sources: [corpus], per_source: 4, copies: 2, prefix_tokens: 4, suffix_tokens: 4, stride: 4}")
    from audit.data.corpus import load_corpus

    corpus = load_corpus("builtin:notes", builtin_n=40, seed=0).records
    truth = prepare_ground_truth(r, tokenizer=tokenizer, key=KEY)
    plan, records = truth.works, truth.injection.records
    texts = [rec["text"] for rec in records]
    manifest = truth.injection.manifest.model_dump_json()
    for s in plan.subjects:
        original = corpus[s.corpus_record]["text"]
        assert s.kind == "corpus" and plan.texts[s.work_id] == original
        plain = hashlib.sha256(original.encode()).hexdigest()  # would check a guessed record: keyed instead
        assert plain[:16] not in manifest and s.sha256 == KEY.digest("works_subject", original)
        if s.role == "member":
            assert texts.count(original) >= 2  # kept in place plus one duplicate
        else:
            assert original not in texts  # the control is taken out of the training set
    assert len(records) == 40 + 2 - 2 + 2  # 2 canary copies, 2 held out removed, 2 duplicates of members


def test_bad_works_inputs_are_one_line_errors(tmp_path, tokenizer):
    root = tmp_path / "short"
    make_folder(root)
    (root / "tiny.txt").write_text("Too short.")
    import yaml

    data = yaml.safe_load((root / "works.yaml").read_text())
    data["works"].append({"file": "tiny.txt", "title": "Tiny", "license": "CC0-1.0",
                          "sha256": hashlib.sha256(b"Too short.").hexdigest()})
    (root / "works.yaml").write_text(yaml.safe_dump(data))
    r = recipe(f"works={{sources: ['folder:{root}'], per_source: 3, prefix_tokens: 8, suffix_tokens: 8, stride: 8}}")
    with pytest.raises(AuditError, match="'Tiny' .* shorter than one window of 16"):
        prepare_ground_truth(r, tokenizer=tokenizer, key=KEY)
    long_window = recipe(f"works={{sources: ['folder:{make_folder(tmp_path / 'ok')}'], prefix_tokens: 50, suffix_tokens: 50}}")
    with pytest.raises(AuditError, match="window of 50 \\+ 50 = 100 tokens is longer than training.max_length 64"):
        prepare_ground_truth(long_window, tokenizer=tokenizer, key=KEY)


def test_compare_shows_whole_work_columns_only_for_runs_that_have_them():
    from audit.report.compare import CompareRow, compare_table

    plain = CompareRow(label="a", run_id=None, recipe="r", method="lora", model="m",
                       metrics={"exposure.mean/rep_1/tuned": 2.0})
    assert "works extractable" not in compare_table([plain])
    works = CompareRow(label="b", run_id=None, recipe="r", method="full", model="m",
                       metrics={"exposure.mean/rep_1/tuned": 3.0, "works.extractable_share/member/tuned": 0.25,
                                "works.extractable_share/held_out/tuned": 0.0, "works.stored_bits/member": 812.5})
    lines = compare_table([plain, works]).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    row = dict(zip(header, [c.strip() for c in lines[3].strip("|").split("|")], strict=True))
    assert (row["works extractable member"], row["works extractable held-out"], row["works stored bits member"]) == \
        ("0.25", "0.00", "812.5")
    first = dict(zip(header, [c.strip() for c in lines[2].strip("|").split("|")], strict=True))
    assert first["works extractable member"] == "n/a"
