"""The default audit on the real SmolLM2-135M-Instruct (minutes on CPU; CI runs it)."""

from __future__ import annotations

import statistics

import pytest

from audit.cli import main
from audit.report import read_report


@pytest.mark.slow
def test_default_audit_shows_memorization_against_the_null(in_tmp, capsys):
    assert main(["run", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "16x inserted" in printed and "mlflow ui" in printed
    (run_dir,) = (in_tmp / "runs").iterdir()
    report = read_report(run_dir / "report.json")
    assert report.model.source == "smollm2-135m" and report.model.provenance["license"] == "Apache-2.0"
    tiers = {t.repetitions: t for t in report.tiers}
    # 16 copies: at (or next to) the maximum exposure, and reproduced by greedy decoding.
    assert tiers[16].exposure_mean["tuned"] >= report.exposure_max - 1.0
    assert tiers[16].extracted["tuned"] >= 1
    # Never-inserted references stay near the null after tuning; the base model sits near it everywhere.
    assert tiers[0].exposure_mean["tuned"] < 3.0
    base_mean = statistics.fmean(t.exposure_mean["base"] for t in report.tiers for _ in range(t.n))
    assert 0.3 < base_mean < 2.8
