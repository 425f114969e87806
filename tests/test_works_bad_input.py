"""Bad whole-work inputs (issue 25): one line on stderr, exit 2, no run directory or output left behind."""

from __future__ import annotations

import hashlib

import pytest
import yaml

from audit.cli import main

STORY = "The lighthouse keeper counted the ships that passed in the long grey evenings of autumn. " * 12


def folder(root, entries):
    root.mkdir()
    for name, text, _ in entries:
        (root / name).write_text(text)
    manifest = [{"file": name, "title": name, "sha256": hashlib.sha256(text.encode()).hexdigest(), **extra}
                for name, text, extra in entries]
    (root / "works.yaml").write_text(yaml.safe_dump({"works": manifest}))
    return root


@pytest.fixture
def works(in_tmp):
    lic = {"license": "CC-BY-4.0"}
    folder(in_tmp / "short", [("a.txt", STORY, lic), ("b.txt", STORY + " Again.", lic), ("tiny.txt", "Too short.", lic)])
    folder(in_tmp / "nolicense", [("a.txt", STORY, {}), ("b.txt", STORY + " Again.", lic)])
    bad = folder(in_tmp / "badsha", [("a.txt", STORY, lic), ("b.txt", STORY + " Again.", lic)])
    (bad / "b.txt").write_text(STORY + " Changed.")
    folder(in_tmp / "ok", [("a.txt", STORY, lic), ("b.txt", STORY + " Again.", lic)])
    folder(in_tmp / "single", [("a.txt", STORY, lic)])
    return in_tmp


RUN = ["run", "tiny/works_cpu", "--no-tracking", "works.prefix_tokens=8", "works.suffix_tokens=8", "works.stride=8",
       "works.per_source=3"]

CASES = {
    "a work shorter than one window": ([*RUN, "works.sources=['folder:short']"],
                                       "works: 'tiny.txt' (folder:short) has 7 tokens, shorter than one window of 16"),
    "a folder work without a license": ([*RUN, "works.sources=['folder:nolicense']"], "has no license"),
    "a folder work with a wrong sha256": ([*RUN, "works.sources=['folder:badsha']"], "does not match the manifest"),
    "a stride of 0": ([*RUN, "works.sources=['folder:ok']", "works.stride=0"],
                      "'works.stride': Input should be greater than or equal to 1"),
    "a stride that skips tokens": ([*RUN, "works.sources=['folder:ok']", "works.stride=9"], "windows would skip tokens"),
    "a window longer than max_length": ([*RUN, "works.sources=['folder:ok']", "works.prefix_tokens=50",
                                         "works.suffix_tokens=50", "works.stride=50"],
                                        "window of 50 + 50 = 100 tokens is longer than training.max_length 64"),
    "an unknown source": ([*RUN, "works.sources=[shakespear]"], "unknown works source 'shakespear'. Did you mean"),
    "a source with one work": ([*RUN, "works.sources=['folder:single']"], "gave 1 work(s) of at least one window"),
    "inject --stream": (["inject", "tiny/works_cpu", "--out", "gt", "--stream", "works.sources=['folder:ok']"],
                        "cannot plant whole works"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_works_input_is_one_line_and_exit_2(case, works, capsys):
    argv, expected = CASES[case]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and " (fix: " in err, err
    assert expected in err, err
    assert "Traceback" not in captured.out + captured.err
    for left in ("runs", "gt"):
        assert not (works / left).exists() or not any((works / left).iterdir()), f"left {left}/"
