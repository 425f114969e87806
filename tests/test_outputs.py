"""Generated outputs: the secret and works scanners on hand-made text, and the sampling stage on tiny-llama."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.core.layout import LAYOUT
from audit.core.schema import Canary, CanarySet, OutputsSection, SecretSpace
from audit.core.store import StageStore
from audit.score.outputs import (
    WorksIndex,
    approximate_match_distance,
    longest_common_substring,
    near_distance,
    outputs_stage,
    prompts_of,
    scan_samples,
    scan_secrets,
    summarize_outputs,
    symbol_runs,
)

DIGITS = SecretSpace(alphabet=list("0123456789"), length=6)
WORDS = SecretSpace(alphabet=["amber", "bison", "cedar", "delta", "ember"], length=3, separator=" ")
SAMPLED = SecretSpace(kind="sampled", bits=30.0)


def canary(cid: str, secret: str, reps: int, *, prefix: str = "the code of Ms. X is ", work: str | None = None) -> Canary:
    return Canary(id=cid, spec="t", prefix=prefix, secret=secret, suffix=".", repetitions=reps, work=work)


def canary_set(canaries: list[Canary], space: SecretSpace = DIGITS) -> CanarySet:
    return CanarySet(spec="t", spec_version=1, seed=0, space=space, canaries=canaries)


# --------------------------------------------------------------------------------------------------- edit distance


@pytest.mark.parametrize(("pattern", "text", "expected"), [
    ("482910", "code 482910 ok", 0),
    ("482910", "code 482911 ok", 1),   # one substitution
    ("482910", "code 48290 ok", 1),    # one deletion
    ("482910", "code 4829100", 0),     # contained
    ("482910", "code 4182910", 1),    # one insertion
    ("482910", "code 4x8x2x9", 5),
    ("abc", "", 3),
    ("", "anything", 0),
])
def test_approximate_match_distance_on_hand_made_cases(pattern, text, expected):
    assert approximate_match_distance(pattern, text) == expected


def _levenshtein(a, b) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j - 1] + (x != y), prev[j] + 1, cur[j - 1] + 1))
        prev = cur
    return prev[-1]


@settings(max_examples=60, deadline=None)
@given(st.text("0123", min_size=1, max_size=7), st.text("0123", max_size=12))
def test_approximate_match_is_the_best_substring_levenshtein(pattern, text):
    brute = min(_levenshtein(pattern, text[i:j]) for i in range(len(text) + 1) for j in range(i, len(text) + 1))
    assert approximate_match_distance(pattern, text) == brute


@settings(max_examples=60, deadline=None)
@given(st.text("0123456789", min_size=4, max_size=8), st.text("0123456789", max_size=6), st.text("0123456789", max_size=6),
       st.integers(0, 7), st.sampled_from("0123456789"), st.integers(0, 2))
def test_near_distance_finds_every_single_edit(secret, left, right, at, digit, kind):
    """The pigeonhole filter never hides a match: one substitution, insertion or deletion is always found."""
    at = at % len(secret)
    edited = [secret[:at] + digit + secret[at + 1:], secret[:at] + digit + secret[at:], secret[:at] + secret[at + 1:]][kind]
    found = near_distance(secret, left + edited + right, 1)
    assert found is not None and found <= 1


# --------------------------------------------------------------------------------------------------- secret scan


def test_symbol_runs_skip_spacing_but_stop_at_other_text():
    assert symbol_runs("code 4829 10. and 7", DIGITS) == [list("482910"), ["7"]]
    assert symbol_runs("words: amber  bison, cedar", WORDS) == [["amber", "bison"], ["cedar"]]


def test_scan_secrets_exact_near_and_miss():
    c = [canary("m", "482910", 16), canary("r", "130577", 0)]
    hits = {h.canary_id: h for h in scan_secrets("the pin is 482910 today", c, DIGITS, max_edits=1)}
    assert hits["m"].exact and hits["m"].distance == 0 and "r" not in hits
    hits = {h.canary_id: h for h in scan_secrets("pin 4829 10 or 130 578", c, DIGITS, max_edits=1)}
    assert not hits["m"].exact and hits["m"].distance == 0       # other spacing: same digits, not verbatim
    assert not hits["r"].exact and hits["r"].distance == 1       # one digit off
    assert scan_secrets("pin 482 000 and 139 999", c, DIGITS, max_edits=1) == []
    assert scan_secrets("482911", c, DIGITS, max_edits=0) == []   # near matches off


def test_scan_secrets_counts_words_and_characters():
    words = [canary("w", "amber bison cedar", 4)]
    (hit,) = scan_secrets("backup: amber delta cedar!", words, WORDS, max_edits=1)
    assert hit.distance == 1 and not hit.exact
    pii = [canary("p", "Jane Roe, 12 Elm Street", 1)]
    (hit,) = scan_secrets("she lives at  Jane Roe, 12 Elm Stret now", pii, SAMPLED, max_edits=1)
    assert hit.distance == 1
    assert scan_secrets("nothing like it", pii, SAMPLED, max_edits=1) == []


# --------------------------------------------------------------------------------------------------- works overlap


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=12), st.lists(st.integers(0, 4), max_size=12))
def test_longest_common_substring_matches_brute_force(a, b):
    brute = max([k for i in range(len(a)) for j in range(len(b)) for k in range(1, min(len(a) - i, len(b) - j) + 1)
                 if a[i:i + k] == b[j:j + k]], default=0)
    length, end = longest_common_substring(a, b)
    assert length == brute
    if length:
        assert any(a[i:i + length] == b[end - length:end] for i in range(len(a)))


class CharTokenizer:
    """One token per character: a stand-in with the ``tokenizer(text)["input_ids"]`` interface."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(ch) for ch in text]}


def test_works_overlap_by_role():
    excerpts = [canary("m", "to be or not to be", 4, prefix="Hamlet: ", work="w1"),
                canary("r", "all the world's a stage", 0, prefix="Jaques: ", work="w2")]
    index = WorksIndex.build(excerpts, CharTokenizer(), ngram=6)
    assert index.counts == {"member": 1, "reference": 1}
    out = index.overlap([ord(ch) for ch in "he said: to be or not, then left"])
    assert out["member"]["lcs_tokens"] == len(": to be or not") and out["member"]["lcs_canary_id"] == "m"
    assert out["member"]["ngram_share"] > 0
    assert out["reference"]["lcs_tokens"] == len(" the") and out["reference"]["ngram_share"] == 0  # "then" vs "the "
    assert WorksIndex.build([canary("d", "123456", 1)], CharTokenizer(), ngram=4) is None


# --------------------------------------------------------------------------------------------------- summary


def test_summary_counts_per_tier_with_references_as_control_and_no_text():
    cs = canary_set([canary("m16", "482910", 16), canary("m1", "771204", 1), canary("ref", "130577", 0)])
    rows = [{"id": "s0", "prompt_id": "unprompted", "token_ids": [1, 2], "text": "pin 482910 and 482910"},
            {"id": "s1", "prompt_id": "p1", "token_ids": [3], "text": "pin 771205"},
            {"id": "s2", "prompt_id": "p1", "token_ids": [], "text": "nothing"}]
    section = OutputsSection(samples=1, prompts=["Note:", "Today"])
    scanned = scan_samples(rows, cs, CharTokenizer(), section)
    summary, metrics = summarize_outputs(scanned, cs, section, seed=3)
    tiers = {t["repetitions"]: t for t in summary["tiers"]}
    assert tiers[16]["exact_canaries"] == 1 and tiers[16]["samples_exact"] == 1
    assert tiers[1]["exact_canaries"] == 0 and tiers[1]["near_canaries"] == 1 and tiers[1]["canary_ids_near"] == ["m1"]
    assert tiers[0]["exact_canaries"] == tiers[0]["near_canaries"] == 0
    assert metrics["outputs.secret_exact/rep_16"].value == 1 and metrics["outputs.secret_exact/rep_16"].n == 1
    assert metrics["outputs.secret_near/rep_1"].value == 1
    assert metrics["outputs.samples_exact/members"].value == 1 and metrics["outputs.samples"].value == 3
    assert summary["statement"].startswith("1 of 3 samples") and "not 'no risk'" in summary["statement"]
    assert summary["protocol"]["seed"] == 3 and summary["protocol"]["near_unit"] == "digits"
    assert summary["works"] is None and "works_note" in summary
    text = json.dumps(summary)
    assert "482910" not in text and "771204" not in text  # counts and ids only


def test_zero_hits_still_bound_the_rate():
    cs = canary_set([canary("m", "482910", 4), canary("r", "130577", 0)])
    rows = [{"id": f"s{i}", "prompt_id": "unprompted", "token_ids": [], "text": "no digits here"} for i in range(100)]
    summary, metrics = summarize_outputs(scan_samples(rows, cs, CharTokenizer(), OutputsSection(samples=100)), cs,
                                         OutputsSection(samples=100, prompts=[]), seed=0)
    entry = metrics["outputs.samples_exact/members"]
    assert entry.value == 0 and entry.low == 0 and 0.03 < entry.high < 0.04  # 95% Clopper-Pearson: 3.6 / 100
    assert summary["statement"].startswith("0 of 100 samples")


# --------------------------------------------------------------------------------------------------- the stage


def test_outputs_stage_on_tiny_llama_is_seeded_and_keeps_text_in_the_run_dir(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    cs = canary_set([canary("m", "482910", 16), canary("r", "130577", 0)])
    section = OutputsSection(samples=3, prompts=["Note:"], max_new_tokens=12, batch_size=4)
    a = outputs_stage(StageStore(tmp_path / "a"), model, tokenizer, cs, section, seed=5, progress=False)
    b = outputs_stage(StageStore(tmp_path / "b"), model, tokenizer, cs, section, seed=5, progress=False)
    c = outputs_stage(StageStore(tmp_path / "c"), model, tokenizer, cs, section, seed=6, progress=False)
    assert len(a.rows) == 3 * len(prompts_of(section)) == 6
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert (tmp_path / "a" / LAYOUT.outputs).read_text() == (tmp_path / "b" / LAYOUT.outputs).read_text()
    assert all(len(r["token_ids"]) <= 12 and tokenizer.eos_token_id not in r["token_ids"] for r in a.rows)
    assert {r["prompt_id"] for r in a.rows} == {"unprompted", "p1"}
    assert "text" in a.rows[0] and all("text" not in json.dumps(t) for t in a.summary["tiers"])
    # a rerun (resume) reuses the file instead of sampling again
    again = outputs_stage(StageStore(tmp_path / "a"), None, tokenizer, cs, section, seed=5, progress=False)
    assert again.summary["reused"] and again.fingerprint == a.fingerprint


def test_a_resumed_outputs_stage_reuses_outputs_jsonl_through_the_store_untouched(tmp_path, monkeypatch):
    """outputs.jsonl is a stage artifact like the scores: the store says it reuses it, nothing is sampled again, the
    file keeps its bytes (rows with their schema_version) and the summary is the one the first attempt made."""
    import audit.score.outputs

    cs = canary_set([canary("m", "482910", 16), canary("r", "130577", 0)])
    section = OutputsSection(samples=2, prompts=[])
    rows = [{"id": "s00000", "prompt_id": "unprompted", "token_ids": [5, 6], "text": "the code of Ms. X is 482910."},
            {"id": "s00001", "prompt_id": "unprompted", "token_ids": [7], "text": "nothing here"}]
    monkeypatch.setattr(audit.score.outputs, "generate_samples", lambda *a, **kw: [dict(r) for r in rows])
    first = outputs_stage(StageStore(tmp_path), None, None, cs, section, seed=5, progress=False)
    written = (tmp_path / LAYOUT.outputs).read_bytes()
    assert all(json.loads(line)["schema_version"] == 1 for line in written.splitlines())

    def sample_again(*a, **kw):
        raise AssertionError("a resume samples nothing")

    monkeypatch.setattr(audit.score.outputs, "generate_samples", sample_again)
    said: list[str] = []
    again = outputs_stage(StageStore(tmp_path, note=said.append), None, None, cs, section, seed=5, progress=False)
    assert said == [LAYOUT.outputs] and (tmp_path / LAYOUT.outputs).read_bytes() == written
    steady = lambda summary: {k: v for k, v in summary.items() if k not in ("wall_s", "reused")}  # noqa: E731
    assert not first.summary["reused"] and again.summary["reused"] and steady(again.summary) == steady(first.summary)
    assert again.rows == first.rows and again.metrics == first.metrics
    assert again.metrics["outputs.samples_exact/members"].value == 1


def test_outputs_progress_counts_tokens_and_changes_no_sample(tiny_model, tmp_path, capsys, monkeypatch):
    """The token counter rides in generate() as a stopping criterion that never stops: same samples, a moving bar."""
    import re

    monkeypatch.setenv("TQDM_MININTERVAL", "0")  # draw every update: on an idle machine 0.1 s hides all but the last

    model, tokenizer = tiny_model
    cs = canary_set([canary("m", "482910", 16), canary("r", "130577", 0)])
    section = OutputsSection(samples=3, prompts=["Note:"], max_new_tokens=12, batch_size=4)
    quiet = outputs_stage(StageStore(tmp_path / "quiet"), model, tokenizer, cs, section, seed=5, progress=False)
    capsys.readouterr()
    shown = outputs_stage(StageStore(tmp_path / "shown"), model, tokenizer, cs, section, seed=5, progress=True)
    assert shown.fingerprint == quiet.fingerprint
    err = capsys.readouterr().err
    counts = [int(n) for n in re.findall(r"outputs:.*?\| *(\d+)/72 ", err)]  # 6 samples x 12 tokens
    # the bar counts generated tokens (6 samples x 12 tokens = 72), not batches (2): how often it is redrawn on the
    # way depends on the machine's speed, so only the unit and the end are asserted
    assert counts and counts[-1] == 72
