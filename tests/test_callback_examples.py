"""The examples a user copies: a plain TRL ``SFTTrainer`` and a plain ``transformers.Trainer`` script that add only the
two lines (the import and ``callbacks=[CanaryAuditCallback(...)]``), run on tiny-llama, end with a report whose 16-copy
canaries are exposed, whose references sit at the null, and whose memorization curve is in the report and in MLflow.
Slow (two tiny trainings of 210 steps with curve points, ~1 min each on an idle 2-core CPU)."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

needs_measure = pytest.mark.skipif(importlib.util.find_spec("audit.pipeline.measure") is None,
                                   reason="the final audit measures the saved weights as `audit measure` does (issue 13)")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def audit_lines(script: Path) -> list[str]:
    """The source lines of ``script`` that use canary-audit (imports of ``audit`` and names taken from it)."""
    tree = ast.parse(script.read_text())
    lines = script.read_text().splitlines()
    names = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("audit")
             for a in n.names}
    used = {n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom | ast.Import)
            and any((getattr(n, "module", None) or "").startswith("audit") or a.name.startswith("audit") for a in n.names)}
    used |= {n.lineno for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in names}
    return [lines[i - 1].strip() for i in sorted(used)]


@pytest.mark.parametrize("script", ["train_with_callback.py", "trainer_with_callback.py"])
def test_the_example_uses_canary_audit_in_exactly_two_lines(script):
    lines = audit_lines(EXAMPLES / script)
    assert len(lines) == 2, lines
    assert lines[0] == "from audit import CanaryAuditCallback  # added line 1 of 2"
    assert "callbacks=[CanaryAuditCallback(ground_truth=gt" in lines[1] and lines[1].endswith("# added line 2 of 2")


@pytest.mark.slow
@needs_measure
@pytest.mark.parametrize("script", ["train_with_callback.py", "trainer_with_callback.py"])
def test_the_example_trains_tiny_llama_and_ends_with_16_copy_canaries_exposed_and_references_at_the_null(
        script, in_tmp, tiny_model_dir):
    from datasets import Dataset
    from mlflow.tracking import MlflowClient

    from audit import inject_canaries
    from audit.data.corpus import builtin_records
    from audit.report import read_report

    _, gt = inject_canaries(Dataset.from_list(builtin_records("notes", n=120, seed=0)), model="tiny-llama", out=in_tmp / "gt")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), str(gt), str(tiny_model_dir), str(in_tmp / "out")],
                          cwd=in_tmp, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    [run_dir] = [p for p in (in_tmp / "runs").iterdir() if p.is_dir()]
    report = read_report(run_dir / "report.json")
    metrics = report.flat_metrics()
    assert metrics["exposure.mean/rep_16/tuned"].value >= 5.0  # the positive control: learned
    assert metrics["exposure.mean/rep_0/tuned"].value <= 3.2  # references at the null (1.44 bits on average)
    curve = report.curves["exposure.mean/rep_16/tuned"]
    assert len(curve) >= 3 and curve[-1] == (report.training.steps, metrics["exposure.mean/rep_16/tuned"].value)
    assert report.training.steps == 210  # 162 records, batch 8, 10 epochs
    assert (run_dir / "plots" / "curves.png").is_file() and '<section id="curves">' in (run_dir / "report.html").read_text()
    # MLflow: the same curve as step metrics in the callback's run, which holds the final metrics too
    client = MlflowClient(tracking_uri=f"sqlite:///{in_tmp / 'mlflow.db'}")
    history = client.get_metric_history(report.tracking.run_id, "exposure.mean/rep_16/tuned")
    assert sorted(m.step for m in history) == [s for s, _ in curve]  # the live points, then the final audit at the last step


@pytest.mark.slow
@needs_measure
def test_the_callback_run_nests_under_the_users_active_mlflow_run_never_beside_it(in_tmp, monkeypatch):
    """Its final audit builds one report: gates evaluated once, report.json written once, nothing patched after."""
    import mlflow
    from datasets import Dataset
    from helpers import short_sft
    from mlflow.tracking import MlflowClient

    import audit.core.gates
    import audit.report
    from audit import CanaryAuditCallback, inject_canaries
    from audit.data.corpus import builtin_records
    from audit.data.ground_truth import load_tokenizer
    from audit.data.models import resolve_model

    train, gt = inject_canaries(Dataset.from_list(builtin_records("notes", n=40, seed=0)), model="tiny-llama",
                                out=in_tmp / "gt", tiers=(1, 4), exposure_references=15)
    tokenizer = load_tokenizer(resolve_model("tiny-llama", progress=False).path)
    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the user's MLflow setup; the audit finds the same store
    callback = CanaryAuditCallback(ground_truth=gt, every_steps=2, progress=False)
    calls = []
    real_write, real_gates = audit.report.write_report, audit.core.gates.evaluate_gates
    monkeypatch.setattr(audit.report, "write_report", lambda *a, **k: (calls.append("write"), real_write(*a, **k))[1])
    monkeypatch.setattr(audit.core.gates, "evaluate_gates", lambda *a, **k: (calls.append("gates"), real_gates(*a, **k))[1])
    with mlflow.start_run(run_name="users-own-run") as users:
        losses = short_sft(train, tokenizer, in_tmp / "out", [callback], max_steps=4)
    assert calls == ["gates", "write"]
    training = callback.result.report.training
    assert (training.steps, training.final_loss) == (4, pytest.approx(losses[-1]))
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    top_level = {r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags}
    ours = client.get_run(callback.result.report.tracking.run_id)
    assert ours.data.tags["mlflow.parentRunId"] == users.info.run_id
    assert users.info.run_id in top_level and ours.info.run_id not in top_level
    assert len([r for r in runs if r.data.tags.get("mlflow.runName") == ours.data.tags["mlflow.runName"]]) == 1
    steps = sorted(m.step for m in client.get_metric_history(ours.info.run_id, "exposure.mean/rep_4/tuned"))
    assert steps == [2, 4]  # the live point at step 2, the final audit at the last step
    assert callback.result.report.curves["exposure.mean/rep_4/tuned"][-1][0] == 4
