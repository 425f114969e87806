"""A run directory written before the stage store (commit 7f52ba4) still reports, resumes and serves as a parent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from audit.cli import main
from audit.report import read_report

FIXTURE = Path(__file__).parent / "fixtures" / "run_7f52ba4_tiny_lora"


@pytest.fixture
def old_run(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "runs" / "old"
    shutil.copytree(FIXTURE, run, ignore=shutil.ignore_patterns("README.md"))
    return run


def test_an_old_run_dir_still_reports(old_run, capsys):
    assert main(["report", str(old_run)]) == 0
    assert (old_run / "report.html").is_file() and (old_run / "report.md").is_file()
    assert "wrote" in capsys.readouterr().out


def test_an_old_run_dir_resumes_reusing_every_stage_and_reports_the_same_numbers(old_run, capsys, tiny_model_dir):
    before = read_report(old_run / "report.json")
    scores = (old_run / "scores.jsonl").read_bytes()
    status = json.loads((old_run / "run.json").read_text())
    (old_run / "run.json").write_text(json.dumps({**status, "status": "running"}))  # as if killed while reporting
    (old_run / "report.json").unlink()

    assert main(["run", "--resume", str(old_run), "--no-tracking"]) == 0
    err = capsys.readouterr().err
    for reused in ("recipe.yaml", "canaries.jsonl", "manifest.json", "scores_base.jsonl", "trained weights adapter/",
                   "scores_tuned.jsonl"):
        assert f"[audit] resume: reusing {reused}" in err
    after = read_report(old_run / "report.json")
    assert (old_run / "scores.jsonl").read_bytes() == scores
    steady = lambda r: {k: v for k, v in r.flat_metrics().items() if not k.startswith("time.")}  # noqa: E731
    # every number the old report had is unchanged, or withheld now by the disclosure rule (listed in the report);
    # metrics added since come beside them
    withheld = set(after.disclosure.withheld)
    old_keys = {k: v for k, v in steady(before).items() if k not in withheld}
    assert {k: steady(after).get(k) for k in old_keys} == old_keys
    assert withheld and all(k not in steady(after) for k in withheld)
    assert after.training == before.training and after.lineage == before.lineage
    status = json.loads((old_run / "run.json").read_text())
    assert status["status"] == "complete" and status["schema_version"] == 1
    meta = json.loads((old_run / "canaries.meta.json").read_text())  # the sidecar is added, the rows left as they were
    assert meta["canary_set_sha256"] == before.canaries.canary_set_sha256 and meta["seed"] == before.seed


@pytest.mark.slow
def test_an_old_run_dir_is_still_a_parent_for_a_further_tune(old_run):
    """Without canaries.meta.json the parent's canaries are regenerated from its recipe and checked row for row."""
    assert main(["run", "tiny/clean_lora_cpu", f"parent={old_run}", "--quiet", "--no-tracking"]) == 0
    (child,) = [p for p in old_run.parent.iterdir() if p.name.startswith("tiny-clean-lora-cpu-")]
    assert (child / "canaries.jsonl").read_bytes() == (old_run / "canaries.jsonl").read_bytes()
    assert read_report(child / "report.json").parent_run == str(old_run.resolve())
