"""End to end on tiny-llama: `audit run tiny/lora_cpu` writes a complete run directory and an MLflow run."""

from __future__ import annotations

import json

from audit.cli import main
from audit.core.schema import AuditReport
from audit.report import read_report


def test_run_directory_has_every_stage_file(tiny_run):
    run_dir = tiny_run.run_dir
    for name in ("run.json", "recipe.yaml", "canaries.jsonl", "manifest.json", "scores.jsonl", "report.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


def test_report_reads_back_and_shows_memorization(tiny_run):
    run_dir = tiny_run.run_dir
    text = (run_dir / "report.json").read_text()
    report = read_report(run_dir / "report.json")
    assert text == report.model_dump_json(indent=2) + "\n"  # the file is the object's own dump: nothing lost reading it
    assert AuditReport.model_validate_json(report.model_dump_json()) == report  # and the object survives a round trip
    assert report.schema_version == 1 and report.metrics and report.gates
    tiers = {t.repetitions: t for t in report.tiers}
    assert set(tiers) == {0, 1, 4, 16}
    # The 16-copy canaries are learned; the never-inserted references stay near the null. Base exposure of a 2-canary
    # tier is withheld from the shared report (audit.metrics.disclosure): the run directory's scores have it.
    assert "base" not in tiers[16].exposure_mean and "exposure.mean/rep_16/base" in report.disclosure.withheld
    rows = [json.loads(line) for line in (run_dir / "scores.jsonl").read_text().splitlines()]
    base16 = [r["exposure"] for r in rows if r["repetitions"] == 16 and r["model"] == "base"]
    assert tiers[16].exposure_mean["tuned"] > sum(base16) / len(base16) + 3
    assert tiers[16].exposure_mean["tuned"] > tiers[0].exposure_mean["tuned"] + 3
    assert report.model.kind == "builtin" and report.model.source == "tiny-llama"
    assert [n.kind for n in report.lineage] == ["base_weights", "data", "tuned_weights"]
    assert report.lineage[2].parents == [report.lineage[0].id, report.lineage[1].id]
    assert report.training.device == "cpu" and report.training.precision == "fp32"
    assert report.recipe["scoring"]["precision"] == "fp32"  # scoring precision is its own setting, recorded
    assert report.training.gradient_checkpointing is False


def test_scores_cover_every_canary_under_both_models(tiny_run):
    run_dir = tiny_run.run_dir
    canaries = [json.loads(line) for line in (run_dir / "canaries.jsonl").read_text().splitlines()]
    scores = [json.loads(line) for line in (run_dir / "scores.jsonl").read_text().splitlines()]
    assert {(s["canary_id"], s["model"]) for s in scores} == {(c["id"], m) for c in canaries for m in ("base", "tuned")}


def test_ez_mia_ranks_the_16x_canaries_as_members_where_loss_diff_separates_them(tiny_run):
    """The 16x canaries' error zones hold only upward shifts here (tuning raised every token the model still gets
    wrong); the reference code scored them 0, below every reference (AUC 0.00). See tests/test_ez_mia_canaries.py."""
    run_dir = tiny_run.run_dir
    report = read_report(run_dir / "report.json")
    m = report.metrics
    assert m["mia.auc/loss_diff/rep_16"].value == 1.0
    assert m["mia.auc/ez_mia/rep_16"].value >= 0.9
    assert "mia.inverted/ez_mia" not in report.metric_notes


def test_mlflow_run_holds_params_metrics_and_artifacts(tiny_run):
    from mlflow.tracking import MlflowClient

    work, run_dir = tiny_run.work, tiny_run.run_dir
    report = read_report(run_dir / "report.json")
    assert report.tracking is not None
    assert report.tracking.uri == f"sqlite:///{(work / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=report.tracking.uri)
    run = client.get_run(report.tracking.run_id)
    assert run.data.params["training.method"] == "lora"
    assert run.data.params["model.source"] == "tiny-llama"
    assert any(key.startswith("exposure.mean/rep_16") for key in run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "train.loss")) > 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "report.json" in artifacts


def test_same_recipe_and_seed_give_identical_canaries_and_manifest(tiny_run, in_tmp):
    """Determinism: `audit inject` of the same recipe, seed and key, in another directory and process, writes
    byte-identical canaries.jsonl and manifest.json to the run's. No training: these files come before it."""
    assert main(["inject", "tiny/lora_cpu", "--out", "gt"]) == 0
    for name in ("canaries.jsonl", "manifest.json"):
        assert (in_tmp / "gt" / name).read_bytes() == (tiny_run.run_dir / name).read_bytes(), name


def test_packing_reaches_the_trainer_and_the_preflight(in_tmp):
    """``training.packing=bfd`` is TRL's packing, not a label: fewer, fuller sequences, so fewer optimizer steps."""
    import math

    assert main(["run", "tiny/lora_cpu", "--no-tracking", "--quiet", "--no-fail-on-gates", "training.packing=bfd",
                 "training.epochs=1"]) == 0  # one epoch: the positive-control gate may fail; packing is under test
    (run_dir,) = (in_tmp / "runs").iterdir()
    assert json.loads((run_dir / "preflight.json").read_text())["packing"] == "bfd"
    records = json.loads((run_dir / "manifest.json").read_text())["dataset_after"]["n_records"]
    unpacked_steps = math.ceil(records / 8)  # tiny/lora_cpu: batch_size 8, one record per sequence without packing
    assert 0 < json.loads((run_dir / "train.json").read_text())["steps"] < unpacked_steps
