"""End to end on tiny-llama: `audit run tiny/works_cpu` with synthetic works and a licensed folder, small enough for
the fast tier. The run directory holds works_scan.jsonl (0600) and its meta; the report, the human report and
MLflow carry the whole-work metrics; member works are learned and held-out ones are not; secret and licensed text
never reaches a shared file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from helpers import make_folder

from audit.cli import main
from audit.core.schema import WorkWindow
from audit.report import read_report

SMALL = ["corpus.builtin_records=16", "canaries.tiers=[4]", "canaries.members_per_tier=1", "canaries.references=2",
         "scoring.exposure_references=31", "works.per_source=2", "works.copies=8", "works.max_tokens=64",
         "works.prefix_tokens=8", "works.suffix_tokens=8", "works.stride=8", "works.synthetic.tokens=64",
         "outputs.samples=2", "outputs.max_new_tokens=48", "scoring.every_steps=20"]


@pytest.fixture(scope="module")
def works_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("works_e2e")
    folder = make_folder(work / "books")
    old = Path.cwd()
    os.chdir(work)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        code = main(["run", "tiny/works_cpu", "--quiet", "--no-fail-on-gates", *SMALL,
                     f"works.sources=[synthetic, 'folder:{folder}']"])
    finally:
        os.chdir(old)
    assert code == 0
    (run_dir,) = (work / "runs").iterdir()
    return work, run_dir, folder


def test_the_scan_file_has_a_row_per_work_model_and_window_and_stays_private(works_run):
    _, run_dir, _ = works_run
    path = run_dir / "works_scan.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    rows = [WorkWindow.model_validate_json(line) for line in path.read_text().splitlines()]
    meta = json.loads((run_dir / "works_scan.meta.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert meta["schema_version"] == 1 and (meta["prefix_tokens"], meta["suffix_tokens"], meta["stride"]) == (8, 8, 8)
    subjects = {s["work_id"]: s for s in manifest["work_subjects"]}
    assert len(subjects) == 4 and sorted(s["role"] for s in subjects.values()) == ["held_out"] * 2 + ["member"] * 2
    for work_id, s in subjects.items():
        for model in ("base", "tuned"):
            starts = [r.start for r in rows if r.work_id == work_id and r.model == model]
            assert starts[0] == 0 and starts[-1] == s["n_tokens"] - 16 and len(starts) == len(set(starts))
            assert sum(r.code_tokens for r in rows if r.work_id == work_id and r.model == model) == s["n_tokens"] - 1
    members = [p for p in manifest["work_placements"]]
    assert members and all(subjects[p["work_id"]]["role"] == "member" for p in members)


def test_members_are_learned_and_held_out_works_are_the_control(works_run):
    _, run_dir, _ = works_run
    report = read_report(run_dir / "report.json")
    ww = report.whole_works
    by = {(w.kind, w.role): w for w in ww.works}
    for kind in ("synthetic", "licensed"):
        member, held = by[(kind, "member")], by[(kind, "held_out")]
        assert member.models["tuned"].bits_per_byte < held.models["tuned"].bits_per_byte - 1.0
        assert member.models["tuned"].greedy_share > held.models["tuned"].greedy_share
    licensed = by[("licensed", "member")]
    assert licensed.stored_bits > by[("licensed", "held_out")].stored_bits + 50
    m = report.metrics
    assert m["works.greedy_share/synthetic/member/tuned"].value > m["works.greedy_share/synthetic/held_out/tuned"].value
    assert m["works.extractable_share/member/tuned"].n == 2
    assert {g.metric for g in report.gates} >= {"works.greedy_share/synthetic/member/tuned",
                                                  "works.max_extractable_share/member/tuned"}
    assert all(g.value is not None for g in report.gates if g.metric.startswith("works."))  # each gate found its key


def test_secret_and_licensed_text_never_reaches_a_shared_file(works_run):
    work, run_dir, folder = works_run
    report = read_report(run_dir / "report.json")
    for w in report.whole_works.works:
        if w.kind == "synthetic":  # sampled under the audit key: base numbers would check a guessed text
            assert w.models["base"] is None and w.stored_bits is None and w.map.log10_p_z["base"] is None
            assert all(not k.endswith("/base") for k in report.metrics if k.startswith("works.") and "/synthetic/" in k)
        else:
            assert w.models["base"] is not None
        assert all(p.text is None for p in w.passages)  # licensed and synthetic: positions and lengths only
    assert "works.stored_bits/synthetic/member" in report.disclosure.withheld
    from audit.data.works import load_source

    texts = [w.text for w in load_source(f"folder:{folder}")]
    cache = Path(os.environ.get("CANARY_AUDIT_CACHE") or Path.home() / ".cache" / "canary-audit") / "works" / "synthetic"
    texts += [t for f in cache.glob("*.json") for t in json.loads(f.read_text())["texts"]]
    shared = "".join((run_dir / name).read_text() for name in ("report.json", "report.html", "report.md"))
    snippets = [t[i : i + 24] for t in texts for i in range(0, min(len(t), 200) - 24, 24) if len(t[i : i + 24].strip()) > 20]
    assert snippets and not [s for s in snippets if s in shared]


def test_mlflow_gets_the_whole_work_metrics(works_run):
    from mlflow.tracking import MlflowClient

    _, run_dir, _ = works_run
    report = read_report(run_dir / "report.json")
    client = MlflowClient(tracking_uri=report.tracking.uri)
    metrics = client.get_run(report.tracking.run_id).data.metrics
    key = "works.extractable_share/member/tuned"
    assert metrics[key] == pytest.approx(report.metrics[key].value)
    assert "works.max_extractable_share/member/tuned" in metrics
    assert not [k for k in metrics if k.startswith("works.") and "synthetic" in k and k.endswith("/base")]


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_members_are_stored_and_extracted_beyond_held_out_works(in_tmp):
    """The issue's measured claim on `smollm2/works_cpu` (slow tier; the measured run of the whole recipe:
    benchmarks/works_smollm2.json). CI runs it on the first 256 tokens of each work, 8 notes and one 4-copy canary
    tier, in about half the recipe's time: the same 4 + 4 plays and synthetic works, the same claim."""
    assert main(["run", "smollm2/works_cpu", "--quiet", "--no-tracking", "--no-fail-on-gates", "works.max_tokens=256",
                 "works.synthetic.tokens=256", "corpus.builtin_records=8", "canaries.tiers=[4]"]) == 0
    (run_dir,) = (in_tmp / "runs").iterdir()
    report = read_report(run_dir / "report.json")
    m = report.metrics
    assert m["works.extractable_share/member/tuned"].value > m["works.extractable_share/held_out/tuned"].value
    assert m["works.stored_bits/public_domain/member"].value > m["works.stored_bits/public_domain/held_out"].value
    assert m["works.max_extractable_share/synthetic/held_out/tuned"].value == 0  # nobody could know them


def test_the_memorization_curve_follows_the_whole_works_during_training(works_run):
    """scoring.every_steps: each live point scans the works too (tuned-side keys only); the final value closes it."""
    _, run_dir, _ = works_run
    report = read_report(run_dir / "report.json")
    curve = report.curves["works.bits_per_byte/member/tuned"]
    assert len(curve) >= 3 and curve[-1] == (report.training.steps, report.metrics["works.bits_per_byte/member/tuned"].value)
    assert curve[0][1] > curve[-1][1]  # the member works get cheaper as training goes on
    assert not [k for k in report.curves if k.startswith("works.") and not k.endswith("/tuned")]


def test_the_outputs_scan_reports_near_verbatim_recall_of_whole_works(works_run):
    _, run_dir, _ = works_run
    report = read_report(run_dir / "report.json")
    recall = report.outputs.whole_works
    assert set(recall) == {"member", "held_out"} and recall["member"].works == recall["held_out"].works == 2
    assert recall["held_out"].nv_recall_max == 0 and recall["held_out"].blocks == 0  # never planted: never recited
    assert report.metrics["outputs.works_nv_recall/member"].n == 2
    assert "mean nv-recall" in (run_dir / "report.md").read_text()


def test_a_further_clean_tune_measures_the_same_works_and_what_survives(works_run, tmp_path, monkeypatch):
    """audit chain: the parent's works (drawn again, checked against its manifest) are not planted again; base and
    parent scans are reused; report.persistence gets works rows."""
    _, parent, _ = works_run
    monkeypatch.chdir(tmp_path)
    assert main(["run", "tiny/clean_lora_cpu", f"parent={parent}", "--quiet", "--no-tracking", "--no-fail-on-gates",
                 "training.epochs=1", "corpus.builtin_records=16"]) == 0
    (child,) = (tmp_path / "runs").iterdir()
    manifest = json.loads((child / "manifest.json").read_text())
    assert "work_placements" not in manifest  # a clean tune: no work planted again
    rows = [WorkWindow.model_validate_json(line) for line in (child / "works_scan.jsonl").read_text().splitlines()]
    assert {r.model for r in rows} == {"base", "parent", "tuned"}
    before = {(r.work_id, r.start): r.logp_z for r in rows if r.model == "parent"}
    parent_tuned = [WorkWindow.model_validate_json(line) for line in (parent / "works_scan_tuned.jsonl").read_text().splitlines()]
    assert before == {(r.work_id, r.start): r.logp_z for r in parent_tuned}  # reused, not measured again
    report = read_report(child / "report.json")
    works = {r.role: r for r in report.persistence.works}
    assert works["member"].bits.before < works["held_out"].bits.before  # what the parent's tune stored
    assert works["member"].bits.after is not None and "works.extractable_share/member/parent" in report.metrics


def test_audit_measure_scans_the_works_of_a_ground_truth_directory(works_run, tmp_path, monkeypatch):
    """`audit inject` with the same recipe writes the same works into the manifest; `audit measure` on the weights the
    parent run trained scans them base and tuned."""
    _, run_dir, folder = works_run
    monkeypatch.chdir(tmp_path)
    sources = f"works.sources=[synthetic, 'folder:{folder}']"
    assert main(["inject", "tiny/works_cpu", "--out", "gt", *SMALL, sources]) == 0
    gt = json.loads((tmp_path / "gt" / "manifest.json").read_text())
    assert gt["work_subjects"] == json.loads((run_dir / "manifest.json").read_text())["work_subjects"]
    assert main(["measure", "gt", "--model", str(run_dir / "model"), "--quiet", "--no-tracking", "--no-fail-on-gates"]) == 0
    (measured,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    report = read_report(measured / "report.json")
    assert report.whole_works is not None and len(report.whole_works.works) == 4
    ours = read_report(run_dir / "report.json").metrics["works.bits_per_byte/member/tuned"].value
    assert report.metrics["works.bits_per_byte/member/tuned"].value == pytest.approx(ours, abs=1e-3)
