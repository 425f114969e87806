"""Killed runs resume: stage files are reused, training continues from its checkpoint, nothing is overwritten."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers import AUDIT, TORCHRUN_2, audit_env, kill_after_first_checkpoint, tier_report

from audit.cli import main
from audit.core.config import load_recipe
from audit.core.errors import AuditError
from audit.core.store import write_once
from audit.pipeline.resume import last_checkpoint, lock_run_dir

# --------------------------------------------------------------------------------------------------- file rules


def test_write_once_keeps_identical_files_and_refuses_to_overwrite_different_ones(tmp_path):
    path = tmp_path / "canaries.jsonl"
    assert write_once(path, "a\n") is True
    stamp = path.stat().st_mtime_ns
    time.sleep(0.01)
    assert write_once(path, "a\n") is False
    assert path.stat().st_mtime_ns == stamp  # not rewritten
    with pytest.raises(AuditError, match="already exists with different content"):
        write_once(path, "b\n")
    assert path.read_text() == "a\n"


def test_last_checkpoint_takes_the_newest_complete_one_and_sets_half_written_ones_aside(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    import torch
    from safetensors.torch import save_file

    for step, complete in ((10, True), (20, True), (30, False)):
        ckpt = run_dir / "trainer" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, str(ckpt / "adapter_model.safetensors"))
        if complete:
            (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    handle = lock_run_dir(run_dir, resumed=False, progress=False)
    try:
        assert last_checkpoint(handle) == run_dir / "trainer" / "checkpoint-20"
    finally:
        handle.close()
    names = sorted(p.name for p in (run_dir / "trainer").iterdir())
    assert names[:2] == ["checkpoint-10", "checkpoint-20"] and names[2].startswith("incomplete-checkpoint-30-")
    assert json.loads((run_dir / "run.json").read_text())["resumed_from_checkpoint"] == "checkpoint-20"


def test_a_run_directory_in_use_cannot_be_opened_twice(tmp_path):
    first = lock_run_dir(tmp_path, resumed=False, progress=False)
    try:
        with pytest.raises(AuditError, match="in use by another audit process"):
            lock_run_dir(tmp_path, resumed=True, progress=False)
    finally:
        first.close()
    lock_run_dir(tmp_path, resumed=True, progress=False).close()  # the lock goes with its holder


def test_only_rank_0_of_a_torchrun_resume_checks_the_lock(tmp_path, monkeypatch):
    """Rank 0 takes the run's lock as it opens the run; a slower rank 1 reading the run directory after that must not
    refuse it as "in use" (rank 0 would then wait for it in the plan message)."""
    from audit.pipeline.resume import load_resumable

    live = lock_run_dir(tmp_path, resumed=False, progress=False)
    try:
        (tmp_path / "recipe.yaml").write_text((Path(__file__).parent.parent / "recipes" / "tiny" / "lora_cpu.yaml").read_text())
        monkeypatch.setenv("RANK", "1")
        assert load_resumable(tmp_path)[0] == tmp_path
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(AuditError, match="in use by another audit process"):
            load_resumable(tmp_path)
    finally:
        live.close()


@pytest.mark.parametrize("moment", ["locked", "run.json written"])
def test_resuming_a_run_in_its_first_moments_says_it_is_in_use(moment, tmp_path, capsys):
    """A live run takes its lock, then writes run.json, then (seconds later) recipe.yaml: a resume in between is
    refused as in use, not as a run that "stopped before writing recipe.yaml" or is no run directory."""
    from audit.pipeline.resume import _lock

    run = tmp_path / "runs" / "starting"
    run.mkdir(parents=True)
    if moment == "locked":
        fd = _lock(run)
        release = lambda: os.close(fd)  # noqa: E731
    else:
        live = lock_run_dir(run, resumed=False, progress=False)  # what `audit run` does first (audit.pipeline.stages.open_run)
        release = live.close
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    try:
        assert main(["run", "--resume", str(run), "--no-tracking", "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"run {run} is in use by another audit process" in err[0], err
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    finally:
        release()
    assert main(["run", "--resume", str(run), "--no-tracking", "--quiet"]) == 2  # the holder gone: the real reason
    reason = "has no readable run.json" if moment == "locked" else "has no recipe.yaml (the run stopped before writing it)"
    assert reason in capsys.readouterr().err


def test_the_trainer_arguments_logged_on_a_resume_are_those_of_the_first_attempt(tmp_path, monkeypatch):
    """MLflow refuses to change a logged param, and a resume reopens the train stage run: the first attempt's run
    directory is relative (runs/<name>), a resume's is what --resume was given (here absolute, from elsewhere)."""
    from transformers import TrainingArguments

    from audit.train.types import TrainPlan

    def logged(run_dir: Path) -> dict:
        plan = TrainPlan(run_dir=run_dir, train=True)
        arguments = TrainingArguments(output_dir=str(plan.work_dir), use_cpu=True, report_to="none").to_dict()
        return plan.logged_arguments(arguments)

    (tmp_path / "runs" / "x").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    first = logged(Path("runs") / "x")
    monkeypatch.chdir(tmp_path / "runs")
    for resumed in (tmp_path / "runs" / "x", Path("x"), Path("../runs/x/")):
        assert logged(resumed) == first
    assert first["output_dir"] == "trainer" and first["learning_rate"] == TrainingArguments(output_dir="o").learning_rate
    elsewhere = TrainPlan(run_dir=tmp_path / "runs" / "x", train=True).logged_arguments({"output_dir": "/elsewhere/t"})
    assert elsewhere == {"output_dir": "/elsewhere/t"}  # not under the run directory: logged as it is


def test_the_train_stage_logs_the_trainer_arguments_through_the_plan(tmp_path, monkeypatch):
    """The wiring of the test above: what train_stage.train hands the tracker for the arguments train_sft reports."""
    from types import SimpleNamespace

    from audit.train import sft
    from audit.train import stage as train_stage
    from audit.train.types import TrainPlan

    logged: list[dict] = []
    tracker = SimpleNamespace(log_metrics=None, log_stage_metrics=None, log_stage_params=logged.append)

    def fake_train_sft(*args, work_dir, on_params, **kwargs):
        on_params({"output_dir": str(work_dir), "seed": 0})
        return "trained"

    monkeypatch.setattr(sft, "train_sft", fake_train_sft)
    ctx = SimpleNamespace(recipe=load_recipe("tiny/lora_cpu"), added_tokens=[], device=None)
    truth = SimpleNamespace(training_texts=[], secret_spans=None)
    monkeypatch.chdir(tmp_path)
    for run_dir in (Path("runs/x"), tmp_path / "runs" / "x"):  # the first attempt, then `--resume /abs/runs/x`
        plan = TrainPlan(run_dir=run_dir, train=True)
        assert train_stage.train(ctx, (), None, None, truth, plan, tracker=tracker) == "trained"
    assert logged == [{"output_dir": "trainer", "seed": 0}] * 2


# --------------------------------------------------------------------------------------------------- CLI


def test_resume_of_a_complete_run_re_reports_it(tmp_path, capsys):
    run = tmp_path / "runs" / "done"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"status": "complete"}))
    (run / "recipe.yaml").write_text("name: done\nmodel: {source: tiny-llama}\n")
    (run / "report.json").write_text(tier_report({1: (2, 1.5, 0)}, run_id="done").model_dump_json())
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert main(["run", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "is already complete; nothing to resume" in out and "1x inserted" in out
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def test_a_new_run_directory_resumes_nothing_and_a_given_one_answers_from_its_files(tmp_path):
    """RunDir is where a run learns, once, whether it resumes: a new run has nothing recorded and nothing to re-report;
    a resumed one reads its own files, and re-reports only when it completed with a report."""
    from audit.pipeline.resume import NEW_RUN, RunDir

    assert not NEW_RUN.resuming and NEW_RUN.recorded("run.json") is None and NEW_RUN.completed_report() is None
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"status": "failed"}))
    (run / "report.json").write_text(tier_report({1: (2, 1.5, 0)}, run_id="r").model_dump_json())
    resumed = RunDir(run)
    assert resumed.resuming and resumed.recorded("run.json") == run / "run.json" and resumed.recorded("external.json") is None
    assert resumed.completed_report() is None  # failed: there is work left, even with a report from an earlier attempt
    (run / "run.json").write_text(json.dumps({"status": "complete"}))
    assert resumed.completed_report().run_id == "r"
    (run / "report.json").unlink()
    assert resumed.completed_report() is None  # complete but its report is gone: the report stage runs again


def test_resume_refuses_a_run_whose_inputs_changed(tmp_path, capsys, monkeypatch, tiny_model_dir):
    """A stage file that the stored recipe no longer reproduces is an error, and the file is left as it was."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "changed"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"status": "running"}))
    recipe = load_recipe("tiny/lora_cpu", ["corpus.builtin_records=20", "tracking.enabled=false"])
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    (run / "canaries.jsonl").write_text('{"edited": true}\n')
    assert main(["run", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "canaries.jsonl already exists with different content" in err and "\n" not in err.strip()
    assert (run / "canaries.jsonl").read_text() == '{"edited": true}\n'
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "failed" and len(status["resumes"]) == 1


# --------------------------------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_to_the_same_result(tmp_path):
    args = ["run", "tiny/lora_cpu", "--quiet", "training.checkpoint_every=10"]
    killed = tmp_path / "killed"
    killed.mkdir()
    run_dir = kill_after_first_checkpoint(killed, args)

    # Killed mid-training: the earlier stages are on disk, the report is not, and the status says so.
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    assert not (run_dir / "report.json").exists() and not (run_dir / "train.json").exists()
    gate = subprocess.run(AUDIT + ["gate", str(run_dir)], cwd=killed, env=audit_env(), capture_output=True, text=True)
    assert gate.returncode == 2 and "(run status: running; resume it with `audit run --resume" in gate.stderr
    early = {name: ((run_dir / name).read_bytes(), (run_dir / name).stat().st_mtime_ns)
             for name in ("recipe.yaml", "canaries.jsonl", "manifest.json", "scores_base.jsonl")}
    checkpoint = json.loads(next(run_dir.glob("trainer/checkpoint-*/trainer_state.json")).read_text())["global_step"]
    assert checkpoint >= 10

    resumed = subprocess.run(AUDIT + ["run", "--resume", str(run_dir)], cwd=killed, env=audit_env(),
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("scores_base.jsonl", "canaries.jsonl", "manifest.json"):
        assert f"[audit] resume: reusing {name}" in resumed.stderr
    assert f"reusing training checkpoint checkpoint-{checkpoint}" in resumed.stderr

    # Earlier stages were reused untouched, training continued to the end, and the run is complete.
    for name, (data, mtime) in early.items():
        assert (run_dir / name).read_bytes() == data and (run_dir / name).stat().st_mtime_ns == mtime, name
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "complete" and status["resumed_from_checkpoint"] == f"checkpoint-{checkpoint}"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["training"]["steps"] == 210
    assert not (run_dir / "trainer").exists()  # checkpoints dropped once the weights are saved

    # One MLflow run holds the whole loss curve, before and after the kill.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=report["tracking"]["uri"])
    assert report["tracking"]["run_id"] == status["mlflow_run_id"]
    mlflow_run = client.get_run(status["mlflow_run_id"])
    assert mlflow_run.info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(mlflow_run.info.run_id, "train.loss")}
    assert set(range(5, 211, 5)) <= steps

    # Same result as a run that was never interrupted: bit-identical tuned weights and scores.
    clean = tmp_path / "clean"
    clean.mkdir()
    subprocess.run(AUDIT + args + ["--no-tracking"], cwd=clean, env=audit_env(), check=True, capture_output=True, timeout=900)
    (clean_run,) = (clean / "runs").iterdir()
    clean_report = json.loads((clean_run / "report.json").read_text())
    assert report["training"]["weights_fingerprint"] == clean_report["training"]["weights_fingerprint"]
    assert (run_dir / "scores.jsonl").read_bytes() == (clean_run / "scores.jsonl").read_bytes()


@pytest.mark.slow
def test_a_whole_works_run_killed_mid_training_reuses_its_base_scan_and_ends_as_an_uninterrupted_run(tmp_path):
    """The works stage files are stage checkpoints like the canary scores: a resume reads ``works_scan_base.jsonl``
    back untouched instead of scanning every window again, and the finished run equals one never interrupted."""
    args = ["run", "tiny/works_cpu", "--quiet", "--no-tracking", "training.checkpoint_every=10"]
    killed = tmp_path / "killed"
    killed.mkdir()
    run_dir = kill_after_first_checkpoint(killed, args)
    scan = run_dir / "works_scan_base.jsonl"
    assert scan.exists() and not (run_dir / "works_scan_tuned.jsonl").exists()
    before = (scan.read_bytes(), scan.stat().st_mtime_ns)

    resumed = subprocess.run(AUDIT + ["run", "--resume", str(run_dir)], cwd=killed, env=audit_env(),
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[audit] resume: reusing works_scan_base.jsonl" in resumed.stderr
    assert "whole works under base" not in resumed.stderr and "whole works under tuned" in resumed.stderr
    assert (scan.read_bytes(), scan.stat().st_mtime_ns) == before

    clean = tmp_path / "clean"
    clean.mkdir()
    subprocess.run(AUDIT + args, cwd=clean, env=audit_env(), check=True, capture_output=True, timeout=900)
    (clean_run,) = (clean / "runs").iterdir()
    for name in ("works_scan_base.jsonl", "works_scan_tuned.jsonl", "scores.jsonl"):
        assert (run_dir / name).read_bytes() == (clean_run / name).read_bytes(), name
    shared = json.loads((run_dir / "report.json").read_text())["whole_works"]
    assert shared == json.loads((clean_run / "report.json").read_text())["whole_works"]


# --------------------------------------------------------------------------------------------------- torchrun


@pytest.mark.slow  # ~1.5 min on the shared 2-core machine: a one-process tiny audit, then a two-process resume
def test_a_torchrun_resume_with_every_stage_stored_runs_no_stage_on_any_process(tmp_path):
    """Every process of a distributed resume runs the one run_origin; rank 0's plan says nothing is left to score or
    train, so no process enters a collective call (one waiting in a scoring gather that rank 0 never enters would hang
    the run past the timeout) and rank 1 leaves at the guard while rank 0 alone writes the report and prints."""
    args = ["--no-tracking", "--no-fail-on-gates"]
    first = subprocess.run(AUDIT + ["run", "tiny/lora_cpu", "--quiet", *args], cwd=tmp_path, env=audit_env(),
                           capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    stored = {name: (run_dir / name).read_bytes() for name in ("scores_base.jsonl", "train.json", "scores_tuned.jsonl",
                                                              "scores.jsonl")}
    status = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**status, "status": "failed"}))  # stopped while it reported
    (run_dir / "report.json").unlink()

    resumed = subprocess.run([*TORCHRUN_2, "-m", "audit.cli", "run", "--resume", str(run_dir),
                              *args], cwd=tmp_path, env={**audit_env(), "OMP_NUM_THREADS": "1"}, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "terminate called" not in resumed.stderr
    for what in ("scores_base.jsonl", "trained weights adapter/", "scores_tuned.jsonl"):
        assert resumed.stderr.count(f"[audit] resume: reusing {what}") == 1, what  # rank 0 alone prints
    assert resumed.stdout.count("run directory:") == 1
    assert {name: (run_dir / name).read_bytes() for name in stored} == stored
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete" and (run_dir / "report.json").is_file()
    assert list(tmp_path.joinpath("runs").iterdir()) == [run_dir]
