"""Injection: deterministic placement for text and chat records, embed mode, streaming == in-memory, the manifest."""

from __future__ import annotations

import json

import pytest

from audit.core.errors import AuditError
from audit.core.schema import InjectionManifest
from audit.data.canaries import generate_canaries, load_spec
from audit.data.corpus import builtin_records, load_corpus, stream_records
from audit.data.inject import RunningFingerprint, StreamInjector, fingerprint_records, inject


@pytest.fixture(scope="module")
def canaries():
    return generate_canaries(load_spec("words"), seed=0)


def _copies(canaries) -> int:
    return sum(c.repetitions for c in canaries.members())


def test_text_placements_point_at_every_planted_copy(canaries):
    records = builtin_records("notes", n=50, seed=0)
    result = inject(records, canaries, seed=0)
    m = result.manifest
    assert len(result.records) == 50 + _copies(canaries) == m.dataset_after.n_records
    assert m.dataset_before == fingerprint_records(records) and m.dataset_after == fingerprint_records(result.records)
    by_id = {c.id: c for c in canaries.canaries}
    for p in m.placements:
        text = result.records[p.record_index]["text"]
        assert text[p.offset : p.offset + len(by_id[p.canary_id].text)] == by_id[p.canary_id].text
    planted = {p.canary_id for p in m.placements}
    assert planted == {c.id for c in canaries.members()}, "references are never planted"
    assert [r for r in result.records if r["text"] not in {c.text for c in canaries.canaries}] == records


def test_same_inputs_give_a_byte_identical_manifest_and_a_new_seed_moves_the_copies(canaries):
    records = builtin_records("notes", n=80, seed=1)
    a = inject(records, canaries, seed=3).manifest.model_dump_json()
    assert a == inject(records, canaries, seed=3).manifest.model_dump_json()
    b = inject(records, canaries, seed=4).manifest
    assert [p.record_index for p in b.placements] != [p.record_index for p in InjectionManifest.model_validate_json(a).placements]


def test_manifest_round_trips_through_json(canaries):
    manifest = inject(builtin_records("chat", n=60, seed=0), canaries, seed=0, format="messages", mode="embed").manifest
    again = InjectionManifest.model_validate_json(manifest.model_dump_json())
    assert again == manifest and again.sha256() == manifest.sha256()
    assert manifest.schema_version == 1 and manifest.format == "messages" and manifest.placement_mode == "embed"
    assert manifest.spec == "words" and manifest.spec_version == 1 and manifest.canary_set_sha256 == canaries.sha256()


def test_chat_injection_lands_in_the_assistant_turn(canaries):
    records = builtin_records("chat", n=60, seed=0)
    for mode in ("new_record", "embed"):
        result = inject(records, canaries, seed=0, format="messages", mode=mode)
        by_id = {c.id: c for c in canaries.canaries}
        for p in result.manifest.placements:
            message = result.records[p.record_index]["messages"][p.message_index]
            assert message["role"] == "assistant"
            assert message["content"][p.offset : p.offset + len(by_id[p.canary_id].text)] == by_id[p.canary_id].text
            users = [m["content"] for m in result.records[p.record_index]["messages"] if m["role"] != "assistant"]
            assert not any(by_id[p.canary_id].secret in u for u in users)
    no_assistant = [{"messages": [{"role": "user", "content": "hello there"}]} for _ in range(50)]
    result = inject(no_assistant, canaries, seed=0, format="messages", mode="embed")
    p = result.manifest.placements[0]
    assert result.records[p.record_index]["messages"][p.message_index]["role"] == "assistant"


def test_embed_mode_uses_distinct_records_at_word_boundaries(canaries):
    records = builtin_records("notes", n=60, seed=2)
    result = inject(records, canaries, seed=0, mode="embed")
    assert len(result.records) == 60
    indexes = [p.record_index for p in result.manifest.placements]
    assert len(set(indexes)) == len(indexes) == _copies(canaries)
    by_id = {c.id: c for c in canaries.canaries}
    for p in result.manifest.placements:
        text = result.records[p.record_index]["text"]
        assert p.offset == 0 or text[p.offset - 1] == " "
        assert text.replace(by_id[p.canary_id].text, "").split() == records[p.record_index]["text"].split()
    with pytest.raises(AuditError, match="one distinct record per canary copy"):
        inject(records[:5], canaries, seed=0, mode="embed")


def test_streaming_gives_the_same_records_and_manifest(canaries, tmp_path):
    path = tmp_path / "corpus.jsonl"
    records = builtin_records("notes", n=60, seed=0)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    memory = inject(load_corpus(str(path)).records, canaries, seed=0, corpus_source=str(path))
    stream, n = stream_records(str(path))
    injector = StreamInjector(canaries, n_records=n, seed=0, corpus_source=str(path))
    with pytest.raises(RuntimeError):
        injector.manifest()
    out = list(injector.run(stream()))
    assert out == memory.records
    assert injector.manifest() == memory.manifest
    assert set(injector.carriers) == {p.record_index for p in memory.manifest.placements}
    fp = RunningFingerprint()
    for r in records:
        fp.add(r)
    assert fp.result() == fingerprint_records(records)
    assert RunningFingerprint().result() == fingerprint_records([])


def test_a_corpus_that_already_holds_a_secret_is_refused(canaries):
    records = builtin_records("notes", n=20, seed=0)
    records[7] = {"text": "leaked: " + canaries.canaries[3].secret}
    with pytest.raises(AuditError, match=f"canary {canaries.canaries[3].id} already occurs in corpus '' record 7"):
        inject(records, canaries, seed=0)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv", "saved"])
def test_corpus_loads_from_every_local_format(kind, tmp_path):
    import datasets

    records = builtin_records("notes", n=12, seed=0)
    ds = datasets.Dataset.from_list(records)
    path = tmp_path / ("saved" if kind == "saved" else f"c.{kind}")
    {"jsonl": lambda: ds.to_json(str(path)), "parquet": lambda: ds.to_parquet(str(path)),
     "csv": lambda: ds.to_csv(str(path), index=False), "saved": lambda: ds.save_to_disk(str(path))}[kind]()
    corpus = load_corpus(str(path))
    assert corpus.format == "text" and corpus.records == records
    stream, n = stream_records(str(path), max_records=5)
    assert n == 5 and list(stream()) == records[:5]


def test_chat_corpus_format_is_detected_and_checked(tmp_path):
    path = tmp_path / "chat.jsonl"
    chats = builtin_records("chat", n=6, seed=0)
    path.write_text("".join(json.dumps(r) + "\n" for r in chats))
    assert load_corpus(str(path)).format == "messages"
    path.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(AuditError, match=r"record 0: 'messages' is not a list of \{role, content\} messages"):
        load_corpus(str(path))
    with pytest.raises(AuditError, match="neither a text column 'body'"):
        load_corpus("builtin:notes", text_column="body", messages_column="conv")
