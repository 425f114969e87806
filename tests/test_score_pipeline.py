"""`audit run` carries every metric into report.json, MLflow and the printed summary (the session's tiny run)."""

from __future__ import annotations

import json

import pytest

from audit.core.schema import AuditReport
from audit.report import read_report

EXPECTED_KEYS = [
    "exposure.space_mean/rep_16/tuned", "exposure.exact_share/rep_16/tuned", "exposure.extrapolated_mean/rep_0/base",
    "extraction.lcp_mean/rep_16/tuned", "extraction.ned_mean/rep_16/tuned", "extraction.np_extractable/rep_16/tuned",
    "extraction.from_fraction/rep_16/tuned", "extraction.sampled_any/rep_16/tuned", "extraction.sampled_rate/rep_16/tuned",
    "information.bits/rep_16/base", "information.compression/rep_16/tuned", "information.memorized_bits/rep_16",
    "mia.auc/loss", "mia.auc/loss_diff", "mia.auc/loss_ratio", "mia.auc/zlib", "mia.auc/min_k", "mia.auc/min_k_pp",
    "mia.auc/min_k_pp_diff", "mia.auc/loss_diff/rep_16", "privacy.eps_lb", "privacy.eps_ceiling",
]


@pytest.fixture(scope="module")
def audited(tiny_run):
    """The session's tiny run (tests/conftest.py): its run directory, report and printed summary."""
    return tiny_run.run_dir, read_report(tiny_run.run_dir / "report.json"), tiny_run.stdout


def test_report_holds_every_metric(audited):
    _, report, _ = audited
    # every key is there, or withheld from the shared report by the disclosure rule (a base value or a difference
    # to base over a 2-canary tier: audit.metrics.disclosure) and listed as such
    missing = [k for k in EXPECTED_KEYS if k not in report.metrics and k not in report.disclosure.withheld]
    assert not missing
    assert "information.bits/rep_16/base" in report.disclosure.withheld
    assert 0.0 <= report.metrics["mia.auc/loss_diff"].value <= 1.0
    assert report.metrics["privacy.eps_lb"].value <= report.metrics["privacy.eps_ceiling"].value
    assert report.metrics["mia.auc/loss_diff"].n == 12
    # 6 references cannot measure TPR at 1% FPR: refused, with the reason in the report
    assert "mia.tpr_at_1pct/loss_diff" not in report.metrics
    assert report.metric_notes["mia.tpr_at_1pct"].startswith("refused: 6 controls")


def test_metrics_reach_mlflow(audited):
    from mlflow.tracking import MlflowClient

    _, report, _ = audited
    logged = MlflowClient(tracking_uri=report.tracking.uri).get_run(report.tracking.run_id).data.metrics
    flat = report.flat_metrics()  # the one flattener: the keys gates check are the keys MLflow holds
    assert {"mia.auc/min_k_pp", "privacy.eps_lb", "exposure.space_mean/rep_16/tuned", "extraction.exact/rep_16/tuned",
            "train.steps", "gates.total"} <= set(flat)
    missing = sorted(set(flat) - set(logged))
    assert not missing
    for key, entry in flat.items():
        assert logged[key] == pytest.approx(entry.value), key


def test_printed_summary_is_short_and_names_the_metrics(audited):
    _, _, printed = audited
    for phrase in ("whole-space exposure (second scale", "membership inference", "extraction (tuned)", "privacy: epsilon >=",
                   "information:"):
        assert phrase in printed
    assert max(len(line) for line in printed.splitlines()) < 200


def test_scores_carry_no_secret_and_old_reports_still_load(audited):
    run_dir, report, _ = audited
    secrets = [json.loads(line)["secret"] for line in (run_dir / "canaries.jsonl").read_text().splitlines()]
    scores_text = (run_dir / "scores.jsonl").read_text()
    report_text = (run_dir / "report.json").read_text()
    assert not any(s in scores_text or s in report_text for s in secrets)
    legacy = json.loads(report_text)
    del legacy["metrics"], legacy["metric_notes"]
    assert AuditReport.model_validate(legacy).metrics == {}
