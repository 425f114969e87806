"""Further tunes: persistence arithmetic on hand-made scores, recipe inheritance, and the whole chain on tiny-llama."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import TORCHRUN_2

from audit.cli import main
from audit.core.config import load_recipe
from audit.core.schema import BeforeAfter, PersistenceTier, SequenceScore
from audit.pipeline.chain import MIN_LEARNED_BITS, PARENT_LABEL, format_persistence, inherit, persistence


def score(cid: str, model: str, reps: int, bits: float, exposure: float, *, extracted: bool = False) -> SequenceScore:
    return SequenceScore(canary_id=cid, model=model, repetitions=reps, secret_tokens=6, secret_nll_bits=bits, rank=1,
                         n_references=255, exposure=min(exposure, 8.0), extracted=extracted, exposure_space=exposure)


# --------------------------------------------------------------------------------------------------- pure


def test_persistence_ratios_on_hand_made_scores():
    rows = []
    for model, bits16, exp16, bits1 in (("base", 50.0, 1.0, 50.0), (PARENT_LABEL, 10.0, 19.9, 49.5), ("tuned", 30.0, 9.0, 49.8)):
        rows += [score("a", model, 16, bits16, exp16, extracted=model == PARENT_LABEL),
                 score("b", model, 16, bits16, exp16),
                 score("c", model, 1, bits1, 1.5),
                 score("r", model, 0, 50.0, 1.4)]
    tiers, metrics = persistence(rows)
    by = {t["repetitions"]: t for t in tiers}
    # 16x: the first tune took 40 bits off the secret, 20 remain off after the further tune -> half retained
    assert by[16]["retained_bits"] == pytest.approx(0.5)
    assert by[16]["retained_exposure"] == pytest.approx((9.0 - 1.0) / (19.9 - 1.0), abs=1e-6)
    assert by[16]["extracted"] == {"base": 0, "before": 1, "after": 0}
    # 1x: the first tune taught 0.5 bits < MIN_LEARNED_BITS: no ratio (it would be noise over noise)
    assert 50.0 - 49.5 < MIN_LEARNED_BITS and by[1]["retained_bits"] is None
    assert by[0]["retained_bits"] is None  # references are the control, never a ratio
    assert set(metrics) == {"persistence.retained_bits/rep_16", "persistence.retained_exposure/rep_16"}
    assert metrics["persistence.retained_bits/rep_16"].n == 2
    table = format_persistence([PersistenceTier.model_validate(t) for t in tiers], BeforeAfter(before=0.9, after=0.6))
    assert "16x" in table and "0.50" in table and "references" in table


def test_persistence_skips_tiers_missing_a_model():
    rows = [score("a", "base", 4, 50, 1), score("a", "tuned", 4, 40, 5)]
    assert persistence(rows) == ([], {})


def test_inherit_takes_model_canaries_and_scoring_but_keeps_inject(tmp_path):
    from audit.pipeline.chain import ParentRun

    parent_recipe = load_recipe("tiny/lora_cpu", ["canaries.tiers=[2,8]", "scoring.exposure_references=63"])
    child = load_recipe("smollm2/clean_lora_cpu")
    parent = ParentRun(run_dir=tmp_path, recipe=parent_recipe, report=None, train=None, weights_dir=tmp_path, parent=None)  # type: ignore[arg-type]
    got = inherit(child, parent)
    assert got.model == parent_recipe.model and got.scoring == parent_recipe.scoring
    assert got.canaries.tiers == [2, 8] and got.canaries.inject is False
    assert got.training == child.training and got.seed == child.seed == 1
    assert got.parent == str(tmp_path)


def test_bad_parent_is_one_line_and_leaves_no_run_dir(in_tmp, capsys):
    code = main(["run", "tiny/clean_lora_cpu", "--quiet", "--no-tracking", f"parent={in_tmp / 'nowhere'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "parent run" in err[0] and "fix:" in err[0]
    (in_tmp / "half").mkdir()
    (in_tmp / "half" / "run.json").write_text('{"status": "running"}')
    assert main(["run", "tiny/clean_lora_cpu", "--quiet", "--no-tracking", f"parent={in_tmp / 'half'}"]) == 2
    assert "not complete" in capsys.readouterr().err
    assert not (in_tmp / "runs").exists()


# --------------------------------------------------------------------------------------------------- the chain


@pytest.fixture(scope="module")
def chain_runs(tmp_path_factory):
    """`audit chain tiny/lora_cpu`: base -> LoRA tune (+ merged weights) -> outputs -> further clean tune."""
    work = tmp_path_factory.mktemp("chain")
    old = Path.cwd()
    os.chdir(work)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        code = main(["chain", "tiny/lora_cpu", "--quiet", "outputs.samples=2", "outputs.max_new_tokens=16",
                     "training.save_merged=true"])
    finally:
        os.chdir(old)
    assert code == 0
    runs = sorted((work / "runs").iterdir(), key=lambda p: json.loads((p / "run.json").read_text())["started_at"] + p.name)
    assert len(runs) == 2
    from audit.report import read_report

    return work, runs[0], runs[1], read_report(runs[0] / "report.json"), read_report(runs[1] / "report.json")


@pytest.mark.slow
def test_chain_lineage_is_one_closed_graph(chain_runs):
    _, parent_dir, child_dir, parent, child = chain_runs
    kinds = [n.kind for n in parent.lineage]
    assert kinds == ["base_weights", "data", "tuned_weights", "tuned_weights", "outputs"]  # + merged weights, outputs
    tuned = parent.lineage[2]
    assert parent.lineage[3].parents == [tuned.id] and parent.lineage[3].details["form"] == "merged"
    assert parent.lineage[4].parents == [tuned.id] and parent.lineage[4].fingerprint == parent.outputs.fingerprint
    ids = [n.id for n in child.lineage]
    assert len(ids) == len(set(ids)) and ids[: len(parent.lineage)] == [n.id for n in parent.lineage]
    assert all(p in ids for n in child.lineage for p in n.parents)  # every parent is in the graph
    added = child.lineage[len(parent.lineage):]
    assert [n.kind for n in added] == ["data", "tuned_weights", "tuned_weights", "outputs"]  # + its merged weights, outputs
    data, further = added[0], added[1]
    assert data.details["canaries_planted"] is False and "clean" in data.label
    assert further.parents == [tuned.id, data.id] and further.label.startswith("further")
    assert further.fingerprint == child.training.weights_fingerprint
    assert child.parent_run == str(parent_dir.resolve())
    children = [json.loads(line) for line in (parent_dir / "children.jsonl").read_text().splitlines()]
    assert [c["run_dir"] for c in children] == [str(child_dir.resolve())] and children[0]["node"] == further.id


@pytest.mark.slow
def test_further_tune_measures_the_parents_canaries_on_clean_data(chain_runs):
    _, parent_dir, child_dir, parent, child = chain_runs
    assert (child_dir / "canaries.jsonl").read_bytes() == (parent_dir / "canaries.jsonl").read_bytes()
    manifest = json.loads((child_dir / "manifest.json").read_text())
    assert manifest["placements"] == [] and manifest["canary_set_sha256"] == parent.canaries.canary_set_sha256
    assert manifest["dataset_before"] == manifest["dataset_after"]
    # base and parent rows are the parent run's own measurements, reused; the further tune's are new
    parent_rows = {(r["canary_id"], r["model"]): r
                   for r in map(json.loads, (parent_dir / "scores.jsonl").read_text().splitlines())}
    child_rows = [json.loads(line) for line in (child_dir / "scores.jsonl").read_text().splitlines()]
    assert {r["model"] for r in child_rows} == {"base", PARENT_LABEL, "tuned"}
    for r in child_rows:
        if r["model"] != "tuned":
            assert r == {**parent_rows[(r["canary_id"], "tuned" if r["model"] == PARENT_LABEL else "base")], "model": r["model"]}
    tiers = {t.repetitions: t for t in child.persistence.tiers}
    assert set(tiers) == {0, 1, 4, 16} and child.persistence.further_tune_planted_canaries is False
    top = tiers[16]
    assert top.exposure_space.before == pytest.approx(parent.metrics["exposure.space_mean/rep_16/tuned"].value, abs=1e-6)
    # the clean tune plants nothing, so it cannot make the 16x canaries cheaper than the first tune left them ... much
    assert top.bits.after > top.bits.before - 1.0
    assert child.recipe["model"] == parent.recipe["model"] and child.recipe["canaries"]["inject"] is False
    assert child.training.merged_fingerprint and (child_dir / "merged" / "model.safetensors").is_file()


@pytest.mark.slow
def test_chain_keeps_secrets_out_of_reports_and_mlflow(chain_runs):
    from mlflow.tracking import MlflowClient

    work, parent_dir, child_dir, parent, child = chain_runs
    secrets = [json.loads(line)["secret"] for line in (parent_dir / "canaries.jsonl").read_text().splitlines()]
    client = MlflowClient(tracking_uri=parent.tracking.uri)
    for run_dir, report in ((parent_dir, parent), (child_dir, child)):
        run = client.get_run(report.tracking.run_id)
        public = [(run_dir / "report.json").read_text(), json.dumps(run.data.params), json.dumps(run.data.tags),
                  json.dumps(run.data.metrics)]
        for secret in secrets:
            assert not any(re.search(rf"(?<![0-9a-f]){secret}(?![0-9a-f])", text) for text in public), secret
        assert (run_dir / "outputs.jsonl").is_file()
        assert "outputs.jsonl" not in {a.path for a in client.list_artifacts(report.tracking.run_id)}
        assert "outputs.samples" in run.data.metrics
    # the retained share solves for the base bits beside before/after: over a 2-canary tier it is withheld from what
    # is shared (audit.metrics.disclosure), and the report says so
    assert "persistence.retained_bits/rep_16" in child.disclosure.withheld
    assert "persistence.retained_bits/rep_16" not in client.get_run(child.tracking.run_id).data.metrics
    assert client.get_run(child.tracking.run_id).data.tags["canary_audit.parent_mlflow_run"] == parent.tracking.run_id


@pytest.mark.slow
def test_compare_reads_both_chain_runs_from_mlflow(chain_runs, tmp_path, capsys):
    _, parent_dir, child_dir, parent, child = chain_runs
    plot = tmp_path / "cmp.png"
    assert main(["compare", str(parent_dir), str(child_dir), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith((f"| {parent_dir.name}", f"| {child_dir.name}"))]
    assert len(rows) == 2 and "(report.json)" not in out
    assert f"{child.metrics['exposure.space_mean/rep_16/tuned'].value:.2f}" in rows[1]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_tampered_parent_is_refused(chain_runs, tmp_path, capsys):
    _, parent_dir, _, _, _ = chain_runs
    copy = tmp_path / "copy"
    shutil.copytree(parent_dir, copy)
    weights = copy / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert main(["run", "tiny/clean_lora_cpu", "--quiet", "--no-tracking", f"parent={copy}"]) == 2
    assert "does not hold the weights" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_train_together_and_rank_0_alone_writes(tmp_path):
    """DDP over gloo on CPU (torchrun; accelerate launch starts one process on a CPU-only machine): the pipeline's
    multi-process path (audit.train.distributed) gives one run directory, one report and one top-level MLflow run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([*TORCHRUN_2, "-m", "audit.cli", "run", "tiny/lora_cpu", "--quiet",
                           "--no-fail-on-gates", "training.epochs=2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr  # each process destroys its gloo group before it exits
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and proc.stdout.count("run directory:") == 1
    from audit.report import read_report

    report = read_report(runs[0] / "report.json")
    assert json.loads((runs[0] / "run.json").read_text())["status"] == "complete"
    # 162 records, batch 8 per process, 2 processes, 2 epochs: 11 optimizer steps per epoch (one process: 21)
    assert report.training.steps == 22
    assert not (runs[0] / "adapter" / "training_args.bin").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=report.tracking.uri)
    top = [r for r in client.search_runs([report.tracking.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in top] == [report.tracking.run_id]
