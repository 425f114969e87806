"""A real ``mlflow server`` (one worker, sqlite backend, proxied artifacts) on 127.0.0.1: a tiny audit logs to it
over HTTP and the run is read back through the REST API with urllib, as any other client would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow_rest import rest_get, rest_post

from audit.report.tracking import check_tracking_reachable

pytestmark = pytest.mark.slow  # a server start and a tiny audit: about a minute on 2 CPU cores
STAGES = {"inject", "score_base", "train", "score_tuned", "report"}
FAST = ["training.epochs=3", "scoring.exact_exposure=false", "scoring.sampled_extraction_samples=2"]
"""Cheaper than the shipped tiny recipe; tracking is what is under test here, not how much is memorized."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts")],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not come up: {(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker, by our own process group
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def audited(server, tmp_path_factory):
    url, _ = server
    work = tmp_path_factory.mktemp("audit-against-server")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-m", "audit.cli", "run", "tiny/lora_cpu", "--tracking-uri", url, "--no-fail-on-gates",
                          *FAST],
                         cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (work / "runs").iterdir()
    report = json.loads((run_dir / "report.json").read_text())
    return url, run_dir, report, out


def test_check_tracking_reachable_accepts_a_live_server(server):
    check_tracking_reachable(server[0])


def test_the_audit_run_reads_back_over_rest(audited):
    url, _, report, _ = audited
    run_id = report["tracking"]["run_id"]
    assert report["tracking"]["uri"] == url
    run = rest_get(url, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["training.method"] == "lora" and params["model.source"] == "tiny-llama"
    assert float(params["training.epochs"]) == 3
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["canary_audit.base_fingerprint"] == report["model"]["fingerprint"]
    assert tags["canary_audit.tuned_fingerprint"] == report["training"]["weights_fingerprint"]
    assert tags["canary_audit.manifest_sha256"] == report["manifest_sha256"]
    assert tags["canary_audit.git_revision"] == (report["git_revision"] or "unknown")
    assert tags["canary_audit.version.trl"] == report["versions"]["trl"]
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    for key in ("exposure.mean/rep_16/tuned", "exposure.mean/rep_0/tuned", "extraction.exact/rep_16/tuned",
                "mia.auc/min_k_pp", "mia.auc/loss_diff", "time.train_s", "train.steps"):
        assert key in metrics, key
    # tiny's tiers hold 2 canaries, under the disclosure rule's 7: their base numbers are withheld from MLflow too
    withheld = set(report["disclosure"]["withheld"])
    assert "exposure.mean/rep_0/base" in withheld and not withheld & set(metrics)
    assert metrics["exposure.mean/rep_16/tuned"] == pytest.approx(
        next(t["exposure_mean"]["tuned"] for t in report["tiers"] if t["repetitions"] == 16))
    history = rest_get(url, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="train.loss")["metrics"]
    assert len(history) >= 2 and len({m["step"] for m in history}) == len(history)
    (dataset_input,) = run["inputs"]["dataset_inputs"]
    assert dataset_input["dataset"]["digest"] == tags["canary_audit.dataset_sha256"][:16]


def test_each_stage_is_a_nested_run_and_trl_logs_into_train(audited):
    url, _, report, _ = audited
    run_id = report["tracking"]["run_id"]
    found = rest_post(url, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [report["tracking"]["experiment_id"]],
        "filter": f"tags.`mlflow.parentRunId` = '{run_id}'"})["runs"]
    stages = {r["info"]["run_name"]: r for r in found}
    assert set(stages) == STAGES
    for stage in stages.values():
        assert stage["info"]["status"] == "FINISHED"
        assert "time_s" in {m["key"] for m in stage["data"]["metrics"]}
    train_metrics = {m["key"] for m in stages["train"]["data"]["metrics"]}
    assert {"loss", "learning_rate", "grad_norm"} <= train_metrics  # the Trainer's logs, via train_sft's on_log
    train_params = {p["key"] for p in stages["train"]["data"]["params"]}
    assert "per_device_train_batch_size" in train_params


def test_artifacts_hold_the_reports_plots_manifest_and_adapter(audited):
    url, run_dir, report, _ = audited
    run_id = report["tracking"]["run_id"]
    top = {f["path"] for f in rest_get(url, "/api/2.0/mlflow/artifacts/list", run_id=run_id)["files"]}
    assert {"report.json", "report.html", "report.md", "manifest.json", "plots", "adapter"} <= top
    plots = {f["path"] for f in rest_get(url, "/api/2.0/mlflow/artifacts/list", run_id=run_id, path="plots")["files"]}
    assert "plots/exposure_by_tier.png" in plots and "plots/roc.png" in plots
    adapter = {f["path"] for f in rest_get(url, "/api/2.0/mlflow/artifacts/list", run_id=run_id, path="adapter")["files"]}
    assert "adapter/adapter_model.safetensors" in adapter
    with urllib.request.urlopen(f"{url}/get-artifact?{urllib.parse.urlencode({'path': 'report.html', 'run_uuid': run_id})}",
                                timeout=30) as r:
        assert r.read() == (Path(run_dir) / "report.html").read_bytes()


def test_the_cli_stays_quiet(audited):
    """Our progress bars and [audit] lines only: no MLflow INFO, FutureWarnings or library progress bars."""
    _, _, _, out = audited
    err = out.stderr.replace("\r", "\n")
    for noise in ("INFO mlflow", "FutureWarning", "UserWarning", "Adding EOS", "Tokenizing train dataset", "Loading weights",
                  "alembic"):
        assert noise not in err, noise
    assert "[audit] run directory" in err and "train:" in err and "score tuned:" in err
