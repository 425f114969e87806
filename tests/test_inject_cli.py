"""`audit inject` as a standalone stage: the files it writes, streaming == in-memory, pre-flight failures."""

from __future__ import annotations

import json

from audit.cli import main

FILES = ("canaries.jsonl", "manifest.json", "preflight.json", "train.jsonl")


def test_inject_writes_the_stage_files_and_streaming_matches(in_tmp, capsys):
    assert main(["inject", "tiny/lora_cpu", "--out", "mem"]) == 0
    assert main(["inject", "tiny/lora_cpu", "--out", "stream", "--stream"]) == 0
    out = capsys.readouterr().out
    assert "planted 42 canary copies into 162 records" in out and "0 findings" in out
    for name in FILES:
        assert (in_tmp / "mem" / name).read_bytes() == (in_tmp / "stream" / name).read_bytes(), name
    manifest = json.loads((in_tmp / "mem" / "manifest.json").read_text())
    train = [json.loads(line) for line in (in_tmp / "mem" / "train.jsonl").read_text().splitlines()]
    canaries = {c["id"]: c for c in map(json.loads, (in_tmp / "mem" / "canaries.jsonl").read_text().splitlines())}
    for p in manifest["placements"]:
        c = canaries[p["canary_id"]]
        assert c["prefix"] + c["secret"] + c["suffix"] in train[p["record_index"]]["text"]
    assert main(["inject", "tiny/lora_cpu", "--out", "mem"]) == 2, "an existing output is never overwritten"


def test_inject_refuses_a_setup_where_canaries_would_be_truncated(in_tmp, capsys):
    code = main(["inject", "tiny/lora_cpu", "--out", "bad", "corpus.placement=embed", "training.max_length=16"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: pre-flight:") and "truncated" in err
    assert "set training.max_length to at least" in err
    assert len(err.strip().splitlines()) == 1
    assert not (in_tmp / "bad").exists()


def test_inject_puts_chat_canaries_in_assistant_turns(in_tmp):
    assert main(["inject", "tiny/lora_cpu", "--out", "chat", "corpus.source=builtin:chat", "training.max_length=128"]) == 0
    manifest = json.loads((in_tmp / "chat" / "manifest.json").read_text())
    train = [json.loads(line) for line in (in_tmp / "chat" / "train.jsonl").read_text().splitlines()]
    assert manifest["format"] == "messages"
    for p in manifest["placements"]:
        assert train[p["record_index"]]["messages"][p["message_index"]]["role"] == "assistant"


def test_inject_false_plants_nothing_but_keeps_the_measured_set(in_tmp):
    assert main(["inject", "tiny/lora_cpu", "--out", "clean", "canaries.inject=false"]) == 0
    manifest = json.loads((in_tmp / "clean" / "manifest.json").read_text())
    assert manifest["placements"] == [] and manifest["dataset_before"] == manifest["dataset_after"]
    assert len((in_tmp / "clean" / "canaries.jsonl").read_text().splitlines()) == 12
