"""`audit run` with every shipped spec on tiny-llama: canaries, manifest and pre-flight pass their checks, and no
secret leaves canaries.jsonl (report, manifest, scores, MLflow store and artifacts carry ids and hashes only)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from audit.cli import main


def _folder_source(root: Path) -> str:
    import yaml

    root.mkdir()
    from audit.core.rng import SeededStream
    from audit.data.canaries import load_spec

    words, rng = load_spec("words").params["words"], SeededStream(0, "test-work")  # varied text: no near-duplicate excerpts
    text = " ".join(rng.choice(words) + ("." if rng.below(9) == 0 else "") for _ in range(4000))
    (root / "log.txt").write_text(text, encoding="utf-8")
    entry = {"file": "log.txt", "title": "Keeper's log", "author": "test", "license": "CC0-1.0", "source": "test",
             "sha256": hashlib.sha256(text.encode()).hexdigest()}
    (root / "works.yaml").write_text(yaml.safe_dump({"works": [entry]}), encoding="utf-8")
    return f"folder:{root}"


SPECS = {
    "digits": [],
    "words": [],
    "pii": ["training.max_length=128"],
    "traps": ["canaries.params.ppl_band=[1,100000]", "canaries.params.retokenize=false"],
    "works": ["canaries.params.synthetic.tokens=128"],
}


@pytest.mark.slow
@pytest.mark.parametrize("spec", list(SPECS))
def test_audit_run_with_each_shipped_spec(spec, in_tmp):
    overrides = [f"canaries.spec={spec}", "training.epochs=1", "scoring.exposure_references=31", *SPECS[spec]]
    if spec == "works":
        overrides.append(f"canaries.params.sources=[{_folder_source(in_tmp / 'works')},synthetic]")
    tracking = ["--no-tracking"] if spec != "digits" else []
    # one epoch: the recipe's positive-control gate may fail (exit 1); the canaries are under test, not the gates
    assert main(["run", "tiny/lora_cpu", "--quiet", "--no-fail-on-gates", *tracking, *overrides]) == 0
    (run_dir,) = (in_tmp / "runs").iterdir()
    canaries = [json.loads(line) for line in (run_dir / "canaries.jsonl").read_text().splitlines()]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    preflight = json.loads((run_dir / "preflight.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())
    members = {c["id"]: c["repetitions"] for c in canaries if c["repetitions"]}
    assert sorted(p["canary_id"] for p in manifest["placements"]) == sorted(i for i, r in members.items() for _ in range(r))
    assert preflight["findings"] == [] and preflight["placements_checked"] == len(manifest["placements"])
    assert report["canaries"]["spec"] == spec and report["canaries"]["preflight"]["passed"]
    if spec == "works":
        kinds = {w["kind"] for w in report["works"]}
        assert kinds == {"licensed", "synthetic"} and (run_dir / "works.json").is_file()
        assert manifest["works"] == report["works"] and len(manifest["excerpts"]) == len(canaries)
        info = report["metrics"]  # works.bits/* sit with every other metric (and reach gates and MLflow alike)
        # a group too small for the disclosure rule (audit.metrics.disclosure) is listed as withheld, not dropped
        shared = set(info) | set(report["disclosure"]["withheld"])
        assert "works.memorized_bits/synthetic/member" in shared and "works.bits/licensed/held_out/base" in shared
        assert "works.bits/synthetic/member/tuned" in info
    # Confidentiality: the secrets are in canaries.jsonl and nowhere else. Short (6-digit) secrets are searched with
    # the end of their prefix, so a timestamp or a float that happens to contain the digits is not a false alarm.
    secrets = [c["secret"] if len(c["secret"]) >= 8 else c["prefix"][-8:] + c["secret"] for c in canaries]
    stores = [p for p in in_tmp.rglob("*") if p.is_file() and p.name != "canaries.jsonl" and "works" not in p.parts[-2:]]
    stores = [p for p in stores if p.suffix not in {".safetensors", ".bin", ".pt"} and p.stat().st_size < 50_000_000]
    for path in stores:
        data = path.read_bytes()
        leaked = [s for s in secrets if s.encode() in data]
        assert not leaked, f"{path.relative_to(in_tmp)} holds a secret"
