"""`audit measure` end to end on tiny-llama (slow: each trains, then scores two models).

(a) ``audit inject`` -> a plain ``transformers.Trainer`` script that imports nothing of canary-audit -> ``audit measure``:
a complete run directory, report, gates, MLflow run, and the 16-copy canaries exposed.
and ``audit run --resume`` of an interrupted measurement finishes it without training.
(b) measuring the tuned weights of an ``audit run`` reproduces that run's ``scores.jsonl`` (the key correctness check:
the measure path scores exactly as the run path does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from audit.cli import main

pytestmark = pytest.mark.slow

RUN_FILES = ("run.json", "recipe.yaml", "canaries.jsonl", "canaries.meta.json", "manifest.json", "preflight.json",
             "external.json", "scores_base.jsonl", "train.json", "scores_tuned.jsonl", "scores.jsonl", "token_view.json",
             "report.json", "report.html", "report.md")


def _run_dir(root: Path, pattern: str) -> Path:
    (found,) = sorted(root.glob(pattern))
    return found


def test_inject_then_a_foreign_trainer_then_measure_gives_a_complete_audit(in_tmp, tiny_model_dir, capsys):
    from audit.report import read_report

    assert main(["inject", "tiny/lora_cpu", "--out", "gt"]) == 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the trainer cannot even find the audit package
    script = Path(__file__).with_name("external_trainer.py")
    done = subprocess.run([sys.executable, str(script), "gt", str(tiny_model_dir), "trained"], env=env, cwd=in_tmp,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (in_tmp / "trained" / "model.safetensors").is_file()

    # tracking on (./mlflow.db); a full fine-tune of 10 epochs may also lift the 1-copy tier over its gate: that is the
    # model's result, not the tool's, so the exit code is checked against the gates below
    assert main(["measure", "gt", "--model", "trained", "--quiet", "--no-fail-on-gates"]) == 0
    run_dir = _run_dir(in_tmp / "runs", "tiny-lora-cpu-measure-*")
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
    report = read_report(run_dir / "report.json")
    metrics = report.flat_metrics()
    assert metrics["exposure.mean/rep_16/tuned"].value >= 5.0  # the positive control: 16 copies learned
    assert metrics["exposure.mean/rep_0/tuned"].value <= 3.2  # references at the null
    by_metric = {g.metric: g.passed for g in report.gates}
    assert by_metric["exposure.mean/rep_16/tuned"] and by_metric["exposure.mean/rep_0/tuned"]
    (tuned,) = [n for n in report.lineage if n.kind == "tuned_weights"]
    assert tuned.details["training"] == "external" and tuned.fingerprint == report.training.weights_fingerprint
    (data,) = [n for n in report.lineage if n.kind == "data"]
    assert data.fingerprint == json.loads((in_tmp / "gt" / "inject.json").read_text())["manifest_sha256"]
    assert (run_dir / "manifest.json").read_bytes() == (in_tmp / "gt" / "manifest.json").read_bytes()
    assert (run_dir / "canaries.jsonl").read_bytes() == (in_tmp / "gt" / "canaries.jsonl").read_bytes()

    # the rest of the tool reads it unchanged
    assert main(["gate", str(run_dir)]) == (0 if all(by_metric.values()) else 1)
    assert main(["report", str(run_dir)]) == 0
    assert main(["compare", str(run_dir), "--plot", str(in_tmp / "cmp.png")]) == 0
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{in_tmp / 'mlflow.db'}")
    run = client.get_run(report.tracking.run_id)
    assert run.data.tags["canary_audit.training"] == "external"
    assert run.data.metrics["exposure.mean/rep_16/tuned"] == pytest.approx(metrics["exposure.mean/rep_16/tuned"].value)

    # interrupted after the train stage: `audit run --resume` rebuilds the external origin from external.json
    scores = (run_dir / "scores.jsonl").read_bytes()
    for name in ("scores_tuned.jsonl", "scores.jsonl", "token_view.json", "report.json"):
        (run_dir / name).unlink()
    status = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**status, "status": "failed", "error": "killed"}))
    assert main(["run", "--resume", str(run_dir), "--quiet", "--no-fail-on-gates"]) == 0
    assert (run_dir / "scores.jsonl").read_bytes() == scores
    assert not (run_dir / "adapter").exists() and not (run_dir / "model").exists()  # nothing was trained on resume
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


def test_measuring_an_audit_runs_own_adapter_reproduces_its_scores(in_tmp):
    from audit.core.store import read_scores

    assert main(["run", "tiny/lora_cpu", "--no-tracking", "--quiet"]) == 0
    trained = _run_dir(in_tmp / "runs", "tiny-lora-cpu-2*")
    assert main(["measure", str(trained), "--adapter", str(trained / "adapter"), "--no-tracking", "--quiet"]) == 0
    measured = _run_dir(in_tmp / "runs", "tiny-lora-cpu-measure-*")
    before, after = read_scores(trained / "scores.jsonl"), read_scores(measured / "scores.jsonl")
    assert [(r.canary_id, r.model) for r in before] == [(r.canary_id, r.model) for r in after] and len(before) == 24
    for b, a in zip(before, after, strict=True):
        assert abs(b.secret_nll_bits - a.secret_nll_bits) <= 1e-4, (b.canary_id, b.model)
        assert abs(b.exposure - a.exposure) <= 1e-4, (b.canary_id, b.model)
        assert (b.rank, b.n_references, b.extracted) == (a.rank, a.n_references, a.extracted), (b.canary_id, b.model)
        assert b.exact_rank == a.exact_rank, (b.canary_id, b.model)  # the rank over the whole secret space
    report = json.loads((measured / "report.json").read_text())
    assert report["training"]["weights_fingerprint"] == json.loads((trained / "train.json").read_text())["weights_fingerprint"]
