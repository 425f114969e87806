"""`audit run tiny/release_cpu`: the merged model and GGUF Q8_0 / Q4_0 files made from the tuned weights, each read back
from its file and scored like the tuned model (same canaries, same references), in the report as chain links."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from audit.cli import main
from audit.core.layout import LAYOUT
from audit.core.store import read_scores
from audit.data.models import fingerprint_safetensors_dir, sha256_file
from audit.report import read_report

MERGE_TOLERANCE = 1e-4
"""The fp32 merge tolerance tests/test_merge.py states: a merged adapter scores like the adapter on its base."""


@pytest.fixture(scope="module")
def release_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("release")
    old = Path.cwd()
    os.chdir(work)
    try:
        code = main(["run", "tiny/release_cpu", "--quiet", "--no-tracking"])
    finally:
        os.chdir(old)
    assert code == 0
    (run_dir,) = (work / "runs").iterdir()
    return run_dir, read_report(run_dir / "report.json")


def test_each_release_is_a_lineage_node_of_the_tuned_weights_fingerprinted_by_its_file(release_run):
    run_dir, report = release_run
    (tuned,) = [n for n in report.lineage if n.kind == "tuned_weights"]
    nodes = {n.details["model_label"]: n for n in report.lineage if n.kind == "release"}
    assert sorted(nodes) == ["release:merged", "release:q4_0", "release:q8_0"]
    assert all(n.parents == [tuned.id] for n in nodes.values())
    for q in ("q8_0", "q4_0"):
        path = run_dir / LAYOUT.release_dir / f"model.{q}.gguf"
        assert nodes[f"release:{q}"].fingerprint == sha256_file(path) and nodes[f"release:{q}"].details["quantization"] == q
    assert nodes["release:merged"].fingerprint == fingerprint_safetensors_dir(run_dir / LAYOUT.release_dir / "merged")
    rows = {r.label: r for r in report.release.releases}
    assert rows["release:q4_0"].bytes < rows["release:q8_0"].bytes < rows["release:merged"].bytes
    assert all(len(r.tiers) == len(report.tiers) for r in rows.values())


def test_the_merged_release_scores_like_the_adapter_within_the_merge_tolerance(release_run):
    run_dir, _ = release_run
    tuned = {s.canary_id: s for s in read_scores(run_dir / "scores_tuned.jsonl")}
    merged = json.loads((run_dir / "release_merged.json").read_text())["scores"]
    assert len(merged) == len(tuned)
    for row in merged:
        t = tuned[row["canary_id"]]
        assert row["secret_nll_bits"] == pytest.approx(t.secret_nll_bits, abs=MERGE_TOLERANCE)
        assert (row["rank"], row["extracted"]) == (t.rank, t.extracted)


def test_releases_are_measured_by_the_tuned_models_protocol_under_their_labels(release_run):
    _, report = release_run
    flat = report.flat_metrics()
    for label in ("release:merged", "release:q8_0", "release:q4_0"):
        for key in ("exposure.mean/rep_16/{}", "exposure.space_mean/rep_16/{}", "extraction.exact/rep_16/{}",
                    "information.bits/rep_16/{}", "mia.auc/loss_diff/{}", "release.bits_drift/rep_16/{}",
                    "release.rank_changes/rep_0/{}"):
            assert key.format(label) in flat, key.format(label)
    # drift = bits_release - bits_tuned, from the same canaries: the report's bits give it back
    for label in ("release:q8_0", "release:q4_0"):
        drift = flat[f"release.bits_drift/rep_16/{label}"].value
        gap = flat[f"information.bits/rep_16/{label}"].value - flat["information.bits/rep_16/tuned"].value
        assert drift == pytest.approx(gap, abs=1e-5)
    assert abs(flat["release.bits_drift/rep_16/release:merged"].value) < MERGE_TOLERANCE
    assert flat["release.rank_changes/rep_0/release:merged"].value == 0
    # quantizing moved the scores (the releases are not the tuned model scored again)
    assert flat["release.bits_drift/rep_0/release:q4_0"].value != 0
    # report.json says which engine and precision scored each release, as for base and tuned
    assert [(s.model, s.backend, s.precision) for s in report.scored_by] == [
        (m, "hf", "fp32") for m in ("base", "tuned", "release:merged", "release:q8_0", "release:q4_0")]


def test_gates_can_name_a_release(release_run):
    _, report = release_run
    gated = {g.metric: g for g in report.gates}
    assert gated["exposure.mean/rep_16/release:q8_0"].value == report.flat_metrics()["exposure.mean/rep_16/release:q8_0"].value
    assert gated["exposure.mean/rep_16/release:q8_0"].passed


def test_release_numbers_follow_the_disclosure_rule_of_tuned_numbers(release_run):
    _, report = release_run
    withheld = set(report.disclosure.withheld)
    # differences to base over 2 secrets are checkers: withheld, as the tuned model's are
    assert "information.memorized_bits/rep_16/release:q4_0" in withheld
    assert "information.memorized_bits/rep_16/release:q4_0" not in report.metrics
    # a release's own numbers need its weights, like the tuned model's: shared
    assert "information.bits/rep_16/release:q4_0" in report.metrics
    assert not any(k.endswith("release:q4_0") for k in withheld if not k.startswith("information.memorized_bits"))


def test_the_report_has_a_release_section_with_a_table_per_format_and_the_plot(release_run):
    run_dir, _ = release_run
    md = (run_dir / "report.md").read_text()
    section = md.split("## Releases: what is shipped", 1)[1].split("\n## ", 1)[0]
    assert "plots/release_by_format.png" in section and (run_dir / "plots" / "release_by_format.png").is_file()
    for label, what in (("release:merged", "merged into the base"), ("release:q8_0", "GGUF Q8_0"), ("release:q4_0", "GGUF Q4_0")):
        assert f"{label}: " in section and what in section, label
    assert section.count("| tier | n | exposure | exposure - tuned |") == 3
