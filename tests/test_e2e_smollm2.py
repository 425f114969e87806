"""The default audit on the real SmolLM2-135M-Instruct (minutes on CPU; CI runs it)."""

from __future__ import annotations

import statistics

import pytest

from audit.cli import main
from audit.report import read_report


@pytest.mark.slow
@pytest.mark.smollm2
def test_default_audit_reports_tpr_at_1pct_fpr_and_the_null_calibration(in_tmp, capsys):
    assert main(["run", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "16x inserted" in printed and "mlflow ui" in printed
    # the evidence lines (issue 15): TPR at 1% FPR per tier with its interval, and the null calibration
    assert "TPR at 1% FPR (95% Clopper-Pearson interval" in printed and "  loss_diff: all n=24" in printed
    assert "null calibration (32 ranked references'" in printed
    (run_dir,) = (in_tmp / "runs").iterdir()
    report = read_report(run_dir / "report.json")
    assert report.model.source == "smollm2-135m" and report.model.provenance["license"] == "Apache-2.0"
    tiers = {t.repetitions: t for t in report.tiers}
    assert tiers[0].n >= 100 and all(tiers[r].n >= 8 for r in (1, 4, 16))
    assert report.metrics["exposure.null_biased/base"].value == 0  # the base model's references sit at the null
    # exposure grows with the copies (whole-space scale: the sampled one saturates at 7 bits)
    space = [report.metrics[f"exposure.space_mean/rep_{r}/tuned"].value for r in (0, 1, 4, 16)]
    assert space == sorted(space) and space[-1] > space[0] + 5
    # 16 copies: at (or next to) the maximum exposure, and reproduced by greedy decoding.
    assert tiers[16].exposure_mean["tuned"] >= report.exposure_max - 1.0
    assert tiers[16].extracted["tuned"] >= 1
    # Never-inserted references stay near the null after tuning; the base model sits near it everywhere.
    assert tiers[0].exposure_mean["tuned"] < 3.0
    base_mean = statistics.fmean(t.exposure_mean["base"] for t in report.tiers for _ in range(t.exposure_count))
    assert 0.3 < base_mean < 2.8
