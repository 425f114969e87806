"""The two failures of issue 12 end to end, on tiny-llama through the real CLI (slow: each is a tiny audit or two).

* A real ``mlflow server --workers 1`` killed during training: the audit still finishes (exit 0, in bounded time),
  says so in one warning line, keeps what MLflow missed in ``tracking_pending.jsonl``; with the server back,
  ``audit sync RUN_DIR`` replays it and the run reads back whole over REST.
* SIGTERM during training: exit 143, ``run.json`` failed with the signal named, the MLflow parent and train stage
  runs KILLED; ``audit run --resume`` then finishes with one stage run per stage and no ``train.loss`` step twice.
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
import yaml
from mlflow_rest import rest_get, rest_post

pytestmark = pytest.mark.slow
STAGES = {"inject", "score_base", "train", "score_tuned", "report"}
FAST = ["training.epochs=3", "scoring.exact_exposure=false", "scoring.sampled_extraction_samples=2"]


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(root: Path, port: int) -> subprocess.Popen:
    url = f"http://127.0.0.1:{port}"
    log = (root / "server.log").open("a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts")],
        cwd=root, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"mlflow server did not come up: {(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)  # the server and its worker, by our own process group
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _audit(work: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "audit.cli", *args], cwd=work, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _when_training(work: Path, proc: subprocess.Popen, timeout_s: float = 600) -> Path:
    """Wait until the run's first Trainer checkpoint exists (training is under way); return the run directory."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = list(work.glob("runs/*/trainer/checkpoint-*"))
        if found:
            return found[0].parent.parent
        if proc.poll() is not None:
            raise AssertionError(f"the audit ended before training: {proc.communicate()[1][-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("training never started")


def test_an_audit_outlives_its_tracking_server_and_audit_sync_replays_what_it_missed(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_server(root, port)
    try:
        audit = _audit(work, "run", "tiny/lora_cpu", "--tracking-uri", url, "--no-fail-on-gates", *FAST)
        run_dir = _when_training(work, audit)
        killed_at = time.monotonic()
        _stop(server, signal.SIGKILL)  # no goodbye: the server is just gone
        out, err = audit.communicate(timeout=600)
        after_kill = time.monotonic() - killed_at
        assert audit.returncode == 0, err[-3000:]
        assert after_kill < 180, f"the audit took {after_kill:.0f} s after the server died"
        print(f"\naudit finished {after_kill:.0f} s after the server was killed")  # pytest -s prints it (docs/reliability.md)
        warnings = [line for line in err.splitlines() if "[audit] warning: MLflow" in line]  # the watchdog may quote it
        assert len(warnings) == 1 and f"audit sync runs/{run_dir.name}" in warnings[0], warnings
        assert "Traceback" not in err
        assert (run_dir / "tracking_pending.jsonl").is_file()
        report = json.loads((run_dir / "report.json").read_text())
        assert "tracking incomplete" in report["metric_notes"]["tracking"]
        status = json.loads((run_dir / "run.json").read_text())
        assert status["status"] == "complete" and status["tracking"] == "incomplete" and status["tracking_uri"] == url
        assert "tracking incomplete" in out  # the last lines say so too, instead of a link to a partial run

        server = _start_server(root, port)  # back, on the same address and store
        sync = subprocess.run([sys.executable, "-m", "audit.cli", "sync", str(run_dir)], cwd=work, env=_env(),
                              capture_output=True, text=True, timeout=600)
        assert sync.returncode == 0, sync.stderr[-3000:]
        assert not (run_dir / "tracking_pending.jsonl").exists()
        run_id = report["tracking"]["run_id"]
        run = rest_get(url, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
        assert run["info"]["status"] == "FINISHED"
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert metrics["exposure.mean/rep_16/tuned"] == pytest.approx(
            next(t["exposure_mean"]["tuned"] for t in report["tiers"] if t["repetitions"] == 16))
        history = rest_get(url, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="train.loss")
        steps = [m["step"] for m in history["metrics"]]
        every = yaml.safe_load((run_dir / "recipe.yaml").read_text())["training"]["logging_steps"]
        assert sorted(steps) == list(range(every, report["training"]["steps"] + 1, every))  # the whole curve, once
        children = rest_post(url, "/api/2.0/mlflow/runs/search", {
            "experiment_ids": [report["tracking"]["experiment_id"]], "filter": f"tags.`mlflow.parentRunId` = '{run_id}'"})["runs"]
        names = sorted(r["info"]["run_name"] for r in children)
        assert names == sorted(STAGES) and all(r["info"]["status"] == "FINISHED" for r in children)
        train = next(r for r in children if r["info"]["run_name"] == "train")
        assert {"loss", "learning_rate", "grad_norm"} <= {m["key"] for m in train["data"]["metrics"]}
        top = {f["path"] for f in rest_get(url, "/api/2.0/mlflow/artifacts/list", run_id=run_id)["files"]}
        assert {"report.json", "report.html", "adapter"} <= top
    finally:
        _stop(server)


def test_sigterm_marks_the_run_failed_and_killed_and_the_resume_duplicates_nothing(tmp_path):
    from mlflow.tracking import MlflowClient

    audit = _audit(tmp_path, "run", "tiny/lora_cpu", "--no-fail-on-gates", *FAST)
    run_dir = _when_training(tmp_path, audit)
    audit.send_signal(signal.SIGTERM)
    _, err = audit.communicate(timeout=120)
    assert audit.returncode == 143, err[-3000:]
    assert err.rstrip().endswith("interrupted by SIGTERM") and "Traceback" not in err
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "failed" and status["signal"] == "SIGTERM"
    client = MlflowClient(tracking_uri=status["tracking_uri"])
    parent = client.get_run(status["mlflow_run_id"])
    assert parent.info.status == "KILLED"
    stages = {r.info.run_name: r for r in client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    assert stages["train"].info.status == "KILLED"
    assert all(s.info.status == "FINISHED" for name, s in stages.items() if name != "train")

    resumed = subprocess.run([sys.executable, "-m", "audit.cli", "run", "--resume", str(run_dir), "--no-fail-on-gates"],
                             cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    found = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    names = sorted(r.info.run_name for r in found)
    assert names == sorted(STAGES) and all(r.info.status == "FINISHED" for r in found)
    assert next(r for r in found if r.info.run_name == "train").info.run_id == stages["train"].info.run_id
    steps = [m.step for m in client.get_metric_history(parent.info.run_id, "train.loss")]
    every = yaml.safe_load((run_dir / "recipe.yaml").read_text())["training"]["logging_steps"]
    train_steps = json.loads((run_dir / "train.json").read_text())["steps"]
    assert sorted(steps) == list(range(every, train_steps + 1, every))  # each logged step once, none missing
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
