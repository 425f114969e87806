"""Pre-flight checks: each one triggers on a crafted bad case and stays quiet on the default setup."""

from __future__ import annotations

import pytest

from audit.core.errors import AuditError
from audit.core.schema import InjectionManifest, Placement
from audit.data.canaries import generate_canaries, load_spec
from audit.data.corpus import builtin_records
from audit.data.inject import inject
from audit.data.preflight import require_passed, run_preflight, training_texts


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from audit.data.ground_truth import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def canaries():
    return generate_canaries(load_spec("digits"), seed=0)


def _checks(report) -> set[str]:
    return {f.check for f in report.findings}


def test_default_text_injection_passes(tokenizer, canaries):
    result = inject(builtin_records("notes", n=60, seed=0), canaries, seed=0)
    report = run_preflight(result.manifest, canaries, result.records, tokenizer, max_length=64)
    assert report.passed and report.placements_checked == len(result.manifest.placements) == 42
    assert 0 < report.canary_tokens_max <= report.record_tokens_max <= 64 and report.max_length_needed <= 64
    require_passed(report)


def test_truncation_is_caught_for_either_truncation_mode(tokenizer, canaries):
    long_records = [{"text": " ".join(r["text"] for r in builtin_records("notes", n=6, seed=i))} for i in range(60)]
    result = inject(long_records, canaries, seed=0, mode="embed")
    report = run_preflight(result.manifest, canaries, result.records, tokenizer, max_length=48)
    assert _checks(report) == {"truncated"}
    assert 0 < len(report.findings) < 42, "canaries embedded early in a record survive keep_start"
    with pytest.raises(AuditError, match=r"pre-flight: \d+ of 42 canary copies would not reach the loss \(truncated x\d+\).*"
                                         rf"at least {report.max_length_needed}"):
        require_passed(report)
    keep_end = run_preflight(result.manifest, canaries, result.records, tokenizer, max_length=48, truncation_mode="keep_end")
    assert _checks(keep_end) == {"truncated"}
    assert {f.record_index for f in keep_end.findings} != {f.record_index for f in report.findings}
    assert run_preflight(result.manifest, canaries, result.records, tokenizer, max_length=report.max_length_needed).passed


def test_a_canary_in_the_user_turn_is_loss_masked_under_assistant_only_loss(tokenizer, canaries):
    canary = canaries.members()[0]
    record = {"messages": [{"role": "user", "content": canary.text}, {"role": "assistant", "content": "Noted."}]}
    result = inject(builtin_records("chat", n=10, seed=0), canaries, seed=0, format="messages")
    bad = result.manifest.model_copy(update={"placements": [
        Placement(canary_id=canary.id, copy_index=0, record_index=0, offset=0, column="messages", message_index=0)]})
    report = run_preflight(bad, canaries, [record], tokenizer, max_length=256, assistant_only_loss=True)
    assert _checks(report) == {"loss_masked"} and "'user' turn" in report.findings[0].detail
    assert run_preflight(bad, canaries, [record], tokenizer, max_length=256).passed, "full-sequence loss trains on it"
    # the harness's own chat placements are in assistant turns, so they pass under assistant-only loss
    assert run_preflight(result.manifest, canaries, result.records, tokenizer, max_length=256, assistant_only_loss=True).passed


def test_a_canary_in_the_prompt_is_loss_masked_under_completion_only_loss(tokenizer, canaries):
    canary = canaries.members()[0]
    record = {"prompt": canary.text + " Please confirm.", "completion": " Confirmed."}
    manifest = InjectionManifest(seed=0, spec="digits", canary_set_sha256=canaries.sha256(), text_column="text",
                                 corpus_source="", dataset_before={"n_records": 1, "sha256": ""},
                                 dataset_after={"n_records": 1, "sha256": ""},
                                 placements=[Placement(canary_id=canary.id, copy_index=0, record_index=0, offset=0,
                                                       column="prompt")])
    report = run_preflight(manifest, canaries, [record], tokenizer, max_length=256, completion_only_loss=True)
    assert _checks(report) == {"loss_masked"}


def test_packing_that_splits_a_canary_is_caught(tokenizer, canaries):
    long_records = [{"text": " ".join(r["text"] for r in builtin_records("notes", n=4, seed=i))} for i in range(60)]
    result = inject(long_records, canaries, seed=1, mode="embed")
    split = run_preflight(result.manifest, canaries, result.records, tokenizer, max_length=32, packing="bfd_split")
    assert "split_by_packing" in _checks(split)
    texts = training_texts(result.records, format="text", text_column="text", messages_column="messages", tokenizer=tokenizer)
    wrapped = run_preflight(result.manifest, canaries, result.records, tokenizer, max_length=32, packing="wrapped",
                            all_training_texts=texts)
    assert _checks(wrapped) == {"split_by_packing"} and "stream token" in wrapped.findings[0].detail
    unknown = run_preflight(result.manifest, canaries, result.records, tokenizer, max_length=32, packing="wrapped")
    assert len(unknown.findings) == 42, "without the texts, wrapped packing cannot be proven safe"
    fits = inject(builtin_records("notes", n=60, seed=0), canaries, seed=0)
    assert run_preflight(fits.manifest, canaries, fits.records, tokenizer, max_length=64, packing="bfd").passed


def test_a_canary_missing_from_the_training_set_is_caught(tokenizer, canaries):
    result = inject(builtin_records("notes", n=60, seed=0), canaries, seed=0)
    damaged = list(result.records)
    p = result.manifest.placements[0]
    damaged[p.record_index] = {"text": "this record was edited after injection"}
    report = run_preflight(result.manifest, canaries, damaged, tokenizer, max_length=64)
    assert [f.check for f in report.findings] == ["missing"] and report.findings[0].canary_id == p.canary_id
    dropped = run_preflight(result.manifest, canaries, result.records[:10], tokenizer, max_length=64)
    assert _checks(dropped) == {"missing"} and "not in the training set" in dropped.findings[0].detail


def test_chat_records_are_rendered_with_a_fallback_template_and_pass(tokenizer, canaries):
    assert not tokenizer.chat_template
    result = inject(builtin_records("chat", n=60, seed=0), canaries, seed=0, format="messages", mode="embed")
    texts = training_texts(result.records, format="messages", text_column="text", messages_column="messages", tokenizer=tokenizer)
    assert texts[0].startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in texts[0]
    assert run_preflight(result.manifest, canaries, result.records, tokenizer, max_length=256).passed
