"""Releases of a SmolLM2 LoRA audit (slow: `smollm2/quick_cpu` on 48 notes, 6 member canaries and 6 references,
plus three releases scored): the merged model agrees with the adapter, Q8_0 keeps what tuning stored, every release is measured.
The default audit's 124 canaries scored three more times would add minutes to CI and nothing to these checks;
`benchmarks/release.py` measures the default."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from audit.cli import main
from audit.report import read_report

pytestmark = [pytest.mark.slow, pytest.mark.smollm2]


def test_smollm2_releases_keep_the_16_copy_canaries_and_the_merged_model_agrees(tmp_path):
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        # fewer notes, no sampled outputs and 63 references: the releases are what is tested, in CI's time budget
        code = main(["run", "smollm2/quick_cpu", "release.merged=true", "release.gguf=[q8_0,q4_0]", "outputs.samples=0",
                     "corpus.builtin_records=48", "scoring.exposure_references=63", "--quiet", "--no-tracking",
                     "--no-fail-on-gates"])
    finally:
        os.chdir(old)
    assert code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    report = read_report(run_dir / "report.json")
    flat = report.flat_metrics()
    rows = {r.label: r for r in report.release.releases}
    assert list(rows) == ["release:merged", "release:q8_0", "release:q4_0"]
    assert rows["release:q4_0"].bytes < rows["release:q8_0"].bytes < rows["release:merged"].bytes
    lines = (run_dir / "scores_tuned.jsonl").read_text().splitlines()
    tuned = {json.loads(line)["canary_id"]: json.loads(line) for line in lines}
    for row in json.loads((run_dir / "release_merged.json").read_text())["scores"]:
        assert row["secret_nll_bits"] == pytest.approx(tuned[row["canary_id"]]["secret_nll_bits"], abs=1e-4)
    # Q8_0 rounds each weight by at most half a step of max|w| / 127: what 16 copies stored survives it
    assert flat["exposure.mean/rep_16/release:q8_0"].value >= flat["exposure.mean/rep_16/tuned"].value - 1.0
    assert abs(flat["release.bits_drift/rep_16/release:q8_0"].value) < 1.0
    for label in rows:
        assert f"exposure.mean/rep_0/{label}" in flat and f"mia.auc/loss_diff/{label}" in flat
