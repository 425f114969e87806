"""Corpora that are broken in the ways real exports break: bad UTF-8, truncated or binary files, empty
conversations, empty or enormous records, absurd tiers. Each is one line on stderr, ``error: <what> (fix: <how>)``,
exit code 2, no traceback, nothing left behind, for ``audit run`` and for ``audit inject`` (in memory and ``--stream``)."""

from __future__ import annotations

import json

import pytest

from audit.cli import main
from audit.core.errors import AuditError


@pytest.fixture
def corpora(in_tmp, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(in_tmp / "hf"))
    (in_tmp / "latin1.jsonl").write_bytes(b'{"text": "a note"}\n{"text": "caf\xe9 au lait"}\n')
    (in_tmp / "latin1.csv").write_bytes(b"text\nfine\ncaf\xe9\n")
    (in_tmp / "cut_mid_char.jsonl").write_bytes('{"text": "ok"}\n{"text": "caf\u00e9"}'.encode()[:-3])
    (in_tmp / "truncated.jsonl").write_text('{"text": "a note"}\n{"text": "another no')
    (in_tmp / "binary.jsonl").write_bytes(bytes(range(256)) * 8)
    (in_tmp / "corrupt.parquet").write_bytes(b"PAR1" + b"\x00" * 200)
    (in_tmp / "empty_messages.jsonl").write_text('{"messages": []}\n' * 3)
    (in_tmp / "empty_texts.jsonl").write_text('{"text": ""}\n' * 30)
    (in_tmp / "huge_record.jsonl").write_text(json.dumps({"text": "word " * 250_000}) + '\n{"text": "short"}\n')
    return in_tmp


CASES = {
    "invalid UTF-8 (jsonl)": ("corpus.source=latin1.jsonl", "is not valid UTF-8: byte 0xe9 at offset 32 (line 2)"),
    "invalid UTF-8 (csv)": ("corpus.source=latin1.csv", "is not valid UTF-8: byte 0xe9"),
    "file cut inside a character": ("corpus.source=cut_mid_char.jsonl", "ends inside a multi-byte character"),
    "truncated jsonl": ("corpus.source=truncated.jsonl", "is not valid JSON lines: line 2 is not valid JSON"),
    "binary file named .jsonl": ("corpus.source=binary.jsonl", "is not valid UTF-8"),
    "corrupt parquet": ("corpus.source=corrupt.parquet", "is not a readable parquet file (corrupt or truncated)"),
    "empty conversations": ("corpus.source=empty_messages.jsonl", "record 0: 'messages' is an empty conversation"),
    "every record empty": ("corpus.source=empty_texts.jsonl", "all 30 records are empty"),
    "one enormous record": ("corpus.source=huge_record.jsonl", "record 0 has 1,250,000 characters (the limit is 1,000,000)"),
    "tiers that plant 200,000 copies": ("canaries.tiers=[100000]", "would plant 200,000 canary copies (the limit is 100,000)"),
}
COMMANDS = {
    "run": ["run", "tiny/lora_cpu", "--no-tracking"],
    "inject": ["inject", "tiny/lora_cpu", "--out", "gt"],
    "inject --stream": ["inject", "tiny/lora_cpu", "--out", "gt", "--stream"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_corpus_is_one_line_and_exit_2(case, command, corpora, capsys):
    override, expected = CASES[case]
    assert main([*COMMANDS[command], override]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert " (fix: " in err and expected in err, err
    assert "Traceback" not in captured.out + captured.err
    assert "Failed to load" not in err  # datasets' own log line is not shown beside ours
    runs = corpora / "runs"
    assert not runs.exists() or not any(runs.iterdir()), f"left {list(runs.iterdir())}"
    assert not (corpora / "gt" / "train.jsonl").exists() and not (corpora / "gt" / "canaries.jsonl").exists()


def test_a_few_empty_records_are_counted_and_warned_about_not_refused(in_tmp, capsys):
    from audit.data.corpus import load_corpus

    (in_tmp / "some_empty.jsonl").write_text('{"text": ""}\n{"text": "  "}\n{"text": "a note"}\n')
    corpus = load_corpus(str(in_tmp / "some_empty.jsonl"))
    assert len(corpus.records) == 3
    assert capsys.readouterr().err.strip() == (f"warning: corpus '{in_tmp / 'some_empty.jsonl'}': 2 of 3 records are empty "
                                               "(each trains as a lone end-of-text token)")


def test_utf8_check_names_the_line_across_read_blocks(tmp_path):
    """The line number is counted over every block read before the bad byte, not just the block it sits in."""
    from audit.data.corpus import check_utf8

    path = tmp_path / "c.jsonl"
    good = b'{"text": "x"}\n'
    path.write_bytes(good * 100 + b'{"text": "\xff"}\n')
    with pytest.raises(AuditError, match=r"offset 1410 \(line 101\)"):
        check_utf8(path, chunk=64)
    path.write_bytes(good * 100 + '{"text": "\u00e9\u4e2d"}\n'.encode())
    check_utf8(path, chunk=7)  # valid multi-byte characters split across blocks pass
