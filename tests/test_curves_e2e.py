"""``audit run RECIPE scoring.every_steps=N``: the memorization curve of the recipe's own training, in curves.json,
report.json (closed by the final audit), the report's plot and MLflow step metrics. Slow (a tiny audit with curve points)."""

from __future__ import annotations

import json

import pytest

from audit.cli import main


@pytest.mark.slow
def test_audit_run_with_every_steps_records_the_curve_in_the_run_the_report_and_mlflow(in_tmp):
    from mlflow.tracking import MlflowClient

    from audit.report import read_report

    assert main(["run", "tiny/lora_cpu", "scoring.every_steps=70", "--no-fail-on-gates"]) == 0
    [run_dir] = list((in_tmp / "runs").iterdir())
    report = read_report(run_dir / "report.json")
    key = "exposure.mean/rep_16/tuned"
    live = json.loads((run_dir / "curves.json").read_text())["curves"][key]
    assert [s for s, _ in live] == [70, 140]  # no live point at the last step: the final audit measures it
    curve = report.curves[key]
    assert [s for s, _ in curve] == [70, 140, 210] and curve[:2] == [tuple(p) for p in live]
    assert curve[-1] == (210, report.flat_metrics()[key].value)  # closed by the final audit
    assert curve[-1][1] >= 5.0 and report.curves["exposure.mean/rep_0/tuned"][-1][1] <= 3.2
    assert '<section id="curves">' in (run_dir / "report.html").read_text()
    client = MlflowClient(tracking_uri=f"sqlite:///{in_tmp / 'mlflow.db'}")
    steps = sorted(m.step for m in client.get_metric_history(report.tracking.run_id, key))
    assert steps == [70, 140, 210]  # the live points, then the final audit's value at the last step (none at step 0)
