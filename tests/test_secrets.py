"""Canary secrets stay in canaries.jsonl: never in MLflow (params, metrics, tags, artifacts, the store itself), the
CLI output, the run directory's shared files (report.json, report.md/html, scores, manifest) or gate output. The
audit key (tests/conftest.py's fixed test key) appears nowhere at all, not even in canaries.jsonl; its id is recorded.

The canaries use a letter alphabet (``QXZJVKWH``) so a 6-symbol secret cannot turn up by chance inside hex ids,
timestamps or floats, and a hit is a real leak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ALPHABET = "QXZJVKWH"
CONFIDENTIAL = {"canaries.jsonl", ".run.lock"}


def _leaks(blob: bytes, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s.encode() in blob]


def _key_forms() -> list[str]:
    """The audit key as text could carry it: hex either case (the raw bytes are checked by the callers too)."""
    key = os.environ["CANARY_AUDIT_KEY"]
    return [key.lower(), key.upper()]


def _key_leaks(blob: bytes) -> bool:
    return bool(_leaks(blob, _key_forms())) or bytes.fromhex(os.environ["CANARY_AUDIT_KEY"]) in blob


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    work = tmp_path_factory.mktemp("secrets")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    audit = str(Path(sys.executable).parent / "audit")
    run = subprocess.run([audit, "run", "tiny/lora_cpu", "--no-fail-on-gates", "training.epochs=2",
                          f"canaries.params={{alphabet: {ALPHABET}}}"], cwd=work, env=env, capture_output=True, timeout=1800)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    (run_dir,) = (work / "runs").iterdir()
    gate = subprocess.run([audit, "gate", str(run_dir), "--junit", str(work / "gates.xml")], cwd=work, env=env,
                          capture_output=True)
    secrets = [json.loads(line)["secret"] for line in (run_dir / "canaries.jsonl").read_text().splitlines()]
    # The check must be able to fail: secrets exist, were planted, and cannot match by accident.
    assert len(secrets) == 12 and all(len(s) == 6 and set(s) <= set(ALPHABET) for s in secrets)
    assert json.loads((run_dir / "manifest.json").read_text())["placements"]
    assert not [s for s in secrets if s in ALPHABET]
    return work, run_dir, secrets, run.stdout + run.stderr + gate.stdout + gate.stderr


@pytest.mark.slow
def test_cli_and_gate_output_carry_no_secret(audited):
    work, _, secrets, output = audited
    assert b"audit tiny-lora-cpu" in output  # the table was printed
    assert _leaks(output, secrets) == []
    assert _leaks((work / "gates.xml").read_bytes(), secrets) == []


@pytest.mark.slow
def test_run_directory_keeps_secrets_only_in_canaries_jsonl(audited):
    _, run_dir, secrets, _ = audited
    assert _leaks((run_dir / "canaries.jsonl").read_bytes(), secrets) == secrets
    shared = [p for p in run_dir.rglob("*") if p.is_file() and p.name not in CONFIDENTIAL]
    assert {"report.json", "scores.jsonl", "manifest.json", "recipe.yaml", "run.json"} <= {p.name for p in shared}
    for path in shared:  # includes report.md / report.html when the report stage writes them
        assert _leaks(path.read_bytes(), secrets) == [], path


@pytest.mark.slow
def test_mlflow_holds_no_secret(audited):
    from mlflow.tracking import MlflowClient

    work, run_dir, secrets, _ = audited
    report = json.loads((run_dir / "report.json").read_text())
    client = MlflowClient(tracking_uri=report["tracking"]["uri"])
    run = client.get_run(report["tracking"]["run_id"])
    fields = [*run.data.params, *run.data.params.values(), *run.data.metrics, *run.data.tags, *run.data.tags.values(),
              run.info.run_name or ""]
    assert run.data.params and run.data.metrics and run.data.tags
    assert _leaks("\n".join(fields).encode(), secrets) == []
    downloaded = Path(client.download_artifacts(run.info.run_id, "", str(work / "downloaded")))
    files = [p for p in downloaded.rglob("*") if p.is_file()]
    assert any(p.name == "report.json" for p in files)
    for path in files:
        assert _leaks(path.read_bytes(), secrets) == [], path
    # The store itself (sqlite) and the artifact root, byte for byte.
    stores = list(work.glob("mlflow.db*"))
    assert stores
    for path in stores:
        assert _leaks(path.read_bytes(), secrets) == [], path
    for path in (work / "mlartifacts").rglob("*"):
        if path.is_file():
            assert _leaks(path.read_bytes(), secrets) == [], path


@pytest.mark.slow
def test_the_audit_key_is_nowhere_and_its_id_is_recorded(audited):
    from mlflow.tracking import MlflowClient

    from audit.core.keys import resolve_key

    work, run_dir, _, output = audited
    assert not _key_leaks(output)
    files = [p for p in work.rglob("*") if p.is_file()]  # run directory (canaries.jsonl too), mlflow.db, artifacts
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "canaries.jsonl" for p in files)
    assert [p for p in files if _key_leaks(p.read_bytes())] == []
    key_id = resolve_key().id
    for name in ("run.json", "manifest.json", "canaries.meta.json"):
        assert json.loads((run_dir / name).read_text())["key_id"] == key_id, name
    report = json.loads((run_dir / "report.json").read_text())
    assert report["canaries"]["key_id"] == key_id
    run = MlflowClient(tracking_uri=report["tracking"]["uri"]).get_run(report["tracking"]["run_id"])
    assert run.data.tags["canary_audit.key_id"] == key_id
    assert not _key_leaks("\n".join([*run.data.params.values(), *run.data.tags.values()]).encode())
