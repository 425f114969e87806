"""audit.report.tracking against a real MLflow sqlite store: parent + nested stage runs, nesting under a caller's run
(also in another experiment), the trainer's logs landing in the train stage, the dataset input, failures,
resume, reachability. No model is trained here: the tiny end-to-end runs cover that (tests/test_mlflow_server.py).
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from audit.core.errors import AuditError
from audit.report.tracking import (
    PARENT_RUN_TAG,
    check_tracking_reachable,
    report_metric_dict,
    resolve_tracking_uri,
    tracked_run,
    training_set_rows,
)


@pytest.fixture
def store(in_tmp):
    """A sqlite store in the test's directory; afterwards no run is active, the fluent URI and experiment unset."""
    import mlflow
    from mlflow.tracking import MlflowClient, fluent

    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    yield uri, MlflowClient(tracking_uri=uri)
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    fluent._active_experiment_id = None  # a test's mlflow.set_experiment must not leak into the next test
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(name, None)


def _children(client, parent_run):
    found = client.search_runs([parent_run.info.experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{parent_run.info.run_id}'")
    return {r.info.run_name: r for r in found}


def test_one_parent_run_with_a_nested_run_per_stage(store):
    import mlflow

    uri, client = store
    with tracked_run(uri, "canary-audit", "tiny/lora_cpu") as tracker:
        tracker.log_params({"training.lora.r": 8, "model.source": "tiny-llama"})
        tracker.begin_stage("inject", elapsed_s=1.5)
        tracker.log_stage_metrics({"records": 162})
        tracker.begin_stage("train")
        assert mlflow.active_run() is None  # logging is by run id only: nothing is pushed as the fluent run
        tracker.log_metrics({"train.loss": 5.0}, step=1)  # the parent, by id, even while a stage is active
        tracker.end_stage()
        with tracker.stage("report"):  # the pipeline's form: a stage is a block
            assert tracker.current is not None and tracker.current.name == "report"
        assert tracker.current is None
    parent = client.get_run(tracker.run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tiny/lora_cpu"
    assert parent.data.params == {"training.lora.r": "8", "model.source": "tiny-llama"}
    assert parent.data.metrics["train.loss"] == 5.0
    assert PARENT_RUN_TAG not in parent.data.tags
    children = _children(client, parent)
    assert set(children) == {"inject", "train", "report"}
    assert all(c.info.status == "FINISHED" and "time_s" in c.data.metrics for c in children.values())
    assert children["inject"].data.metrics["time_s"] >= 1.5  # counts the stage's work before tracking opened
    assert children["inject"].data.metrics["records"] == 162
    assert "train.loss" not in children["train"].data.metrics
    assert mlflow.active_run() is None


def test_nests_under_the_callers_active_run_in_another_experiment(store):
    """A notebook with its own experiment and run: the audit nests under it and leaves its state as it was."""
    import mlflow

    uri, client = store
    mlflow.set_tracking_uri(uri)
    notebook = mlflow.set_experiment("notebook")
    with mlflow.start_run(run_name="my analysis") as outer:
        assert resolve_tracking_uri(None) == uri  # no explicit URI: the caller's store
        with tracked_run(resolve_tracking_uri(None), "canary-audit", "tiny/lora_cpu") as tracker:
            tracker.begin_stage("train")
            tracker.log_stage_metrics({"loss": 1.0}, step=1)  # what the trainer's on_log forwards
            assert mlflow.active_run().info.run_id == outer.info.run_id  # the audit never replaces the caller's run
        assert mlflow.active_run().info.run_id == outer.info.run_id
        assert mlflow.get_tracking_uri() == uri
        mlflow.log_metric("after_audit", 1.0)  # the caller's run still takes its own metrics
    audit_run = client.get_run(tracker.run_id)
    assert audit_run.data.tags[PARENT_RUN_TAG] == outer.info.run_id
    assert client.get_experiment(audit_run.info.experiment_id).name == "canary-audit"
    assert audit_run.info.experiment_id != notebook.experiment_id
    stage = client.get_run(tracker.stage_run_ids["train"])
    assert stage.data.tags[PARENT_RUN_TAG] == tracker.run_id and stage.data.metrics["loss"] == 1.0
    outer_run = client.get_run(outer.info.run_id)
    assert outer_run.data.metrics == {"after_audit": 1.0} and outer_run.info.status == "FINISHED"
    # set_experiment is the caller's again: a new run of theirs goes to "notebook"
    with mlflow.start_run() as later:
        assert later.info.experiment_id == notebook.experiment_id


def test_caller_run_in_another_store_is_recorded_not_linked(store, tmp_path):
    import mlflow

    uri, client = store
    other = f"sqlite:///{tmp_path / 'other.db'}"
    mlflow.set_tracking_uri(other)
    with mlflow.start_run() as outer:
        with tracked_run(uri, "canary-audit", "x") as tracker:
            tracker.begin_stage("train")
        assert mlflow.get_tracking_uri() == other and mlflow.active_run().info.run_id == outer.info.run_id
    tags = client.get_run(tracker.run_id).data.tags
    assert PARENT_RUN_TAG not in tags and tags["canary_audit.caller_run"] == f"{other} {outer.info.run_id}"


def test_the_trainers_logs_and_arguments_reach_the_train_stage_through_train_sft(store, tmp_path, tiny_model_dir):
    """What replaced TRL's MLflowCallback: train_sft's on_log / on_params forwarded to the tracker land in the
    train stage run (loss, grad_norm, learning_rate per step; TrainingArguments as params), train.loss on the
    parent, and the callback never starts a run of its own."""
    import torch

    from audit.core.schema import TrainingSection
    from audit.data.models import load_model_and_tokenizer
    from audit.train.sft import choose_device, train_sft

    uri, client = store
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")
    section = TrainingSection(method="lora", epochs=1, learning_rate=2e-2, batch_size=4, logging_steps=1, checkpoint_every=0)
    with tracked_run(uri, "canary-audit", "x") as tracker:
        tracker.begin_stage("train")
        train_sft(model, tokenizer, [f"note {i} about the weather" for i in range(12)], section=section, seed=0,
                  work_dir=tmp_path / "t", weights_dir=tmp_path / "adapter", device=choose_device(section), progress=False,
                  on_loss=lambda step, loss: tracker.log_metrics({"train.loss": loss}, step=step),
                  on_log=lambda step, logs: tracker.log_stage_metrics(logs, step), on_params=tracker.log_stage_params)
        tracker.end_stage()
    stage = client.get_run(tracker.stage_run_ids["train"])
    assert {"loss", "grad_norm", "learning_rate", "epoch"} <= set(stage.data.metrics)
    assert [m.step for m in sorted(client.get_metric_history(stage.info.run_id, "loss"), key=lambda m: m.step)] == [1, 2, 3]
    assert stage.data.params["learning_rate"] == "0.02" and stage.data.params["per_device_train_batch_size"] == "4"
    assert len(client.get_metric_history(tracker.run_id, "train.loss")) == 3
    runs = client.search_runs([stage.info.experiment_id])
    assert {r.info.run_id for r in runs} == {tracker.run_id, stage.info.run_id}


def test_a_failing_audit_marks_its_run_and_open_stage_failed(store):
    uri, client = store
    with pytest.raises(RuntimeError, match="boom"):
        with tracked_run(uri, "canary-audit", "x") as tracker:
            tracker.begin_stage("train")
            raise RuntimeError("boom")
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    assert client.get_run(tracker.stage_run_ids["train"]).info.status == "FAILED"


def test_resume_reopens_the_same_parent_run(store):
    uri, client = store
    with pytest.raises(KeyboardInterrupt):
        with tracked_run(uri, "canary-audit", "x") as first:
            first.log_params({"seed": 0})
            raise KeyboardInterrupt
    assert client.get_run(first.run_id).info.status == "KILLED"
    with tracked_run(uri, "canary-audit", "x", run_id=first.run_id) as again:
        again.log_params({"seed": 0})  # the same value again is accepted
        again.begin_stage("score_tuned")
    assert again.run_id == first.run_id and client.get_run(first.run_id).info.status == "FINISHED"
    assert set(_children(client, client.get_run(first.run_id))) == {"score_tuned"}


def test_training_set_is_a_schema_only_dataset_input_with_the_manifest_digest(store):
    from audit.core.schema import DatasetFingerprint, InjectionManifest, Placement

    uri, client = store
    manifest = InjectionManifest(
        seed=0, spec="digits", canary_set_sha256="e" * 64, text_column="text", corpus_source="builtin:notes",
        dataset_before=DatasetFingerprint(n_records=3, sha256="1" * 64),
        dataset_after=DatasetFingerprint(n_records=4, sha256="ab" * 32),
        placements=[Placement(canary_id="c1", copy_index=0, record_index=3, offset=0),
                    Placement(canary_id="c1", copy_index=1, record_index=1, offset=5)])
    assert training_set_rows(manifest, [10, 20, 30, 40]) == {"record_index": [0, 1, 2, 3], "chars": [10, 20, 30, 40],
                                                            "canary_copies": [0, 1, 0, 1]}
    with tracked_run(uri, "canary-audit", "x") as tracker:
        tracker.begin_stage("inject")
        tracker.log_training_dataset(manifest, [10, 20, 30, 40], name="builtin:notes + digits canaries")
    for run_id in (tracker.run_id, tracker.stage_run_ids["inject"]):
        (dataset_input,) = client.get_run(run_id).inputs.dataset_inputs
        ds = dataset_input.dataset
        assert ds.digest == "ab" * 8 and ds.name == "builtin:notes + digits canaries"
        assert '"num_rows": 4' in ds.profile and "canary_copies" in ds.schema and "text" not in ds.schema
        assert [(t.key, t.value) for t in dataset_input.tags] == [("mlflow.data.context", "training")]
    assert client.get_run(tracker.run_id).data.tags["canary_audit.dataset_sha256"] == "ab" * 32


def test_report_metric_dict_has_every_stable_key():
    from helpers import FAILING, make_report, synthetic_scores

    report = make_report(synthetic_scores(), gates=FAILING)
    flat = report_metric_dict(report)
    for key in ("exposure.mean/rep_16/tuned", "exposure.mean/rep_0/base", "extraction.exact/rep_16/tuned",
                "mia.auc/min_k_pp", "mia.auc/loss_diff", "exposure.space_mean/rep_4/tuned", "information.bits/rep_16/tuned",
                "time.train_s", "train.steps", "train.final_loss", "gates.failed", "gates.total"):
        assert key in flat, key
    assert flat["gates.failed"] == 1.0 and flat["time.train_s"] == 12.0
    assert set(report.metrics) <= set(flat)
    assert all(isinstance(v, float) for v in flat.values())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_is_refused_before_anything_starts():
    uri = f"http://127.0.0.1:{_closed_port()}"
    start = time.perf_counter()
    with pytest.raises(AuditError, match=f"MLflow tracking server {uri} is unreachable") as info:
        check_tracking_reachable(uri, timeout_s=2.0)
    assert "--no-tracking" in info.value.one_line()
    assert time.perf_counter() - start < 30  # a refused connection, not a training run's worth of waiting


def test_bad_local_stores_are_refused(tmp_path, monkeypatch):
    with pytest.raises(AuditError, match="does not exist"):
        check_tracking_reachable(f"sqlite:///{tmp_path}/missing/m.db")
    check_tracking_reachable(f"sqlite:///{tmp_path}/m.db")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(AuditError, match="file store"):
        check_tracking_reachable(f"file://{tmp_path}/mlruns")


def test_tracking_uri_resolution(in_tmp, monkeypatch):
    assert resolve_tracking_uri(None) == f"sqlite:///{(in_tmp / 'mlflow.db').resolve()}"
    assert resolve_tracking_uri("store/m.db") == f"sqlite:///{(in_tmp / 'store' / 'm.db').resolve()}"
    assert resolve_tracking_uri("http://host:5000") == "http://host:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(None) == "http://env:5000"


def test_tracking_off_is_a_null_tracker_that_takes_every_call_and_logs_nothing(tmp_path, monkeypatch):
    from audit.report.tracking import NullTracker, open_tracker

    monkeypatch.chdir(tmp_path)
    with open_tracker(False, f"sqlite:///{tmp_path}/mlflow.db", "canary-audit", "x") as tracker:
        assert isinstance(tracker, NullTracker) and tracker.run_id is None and tracker.info() is None
        tracker.log_params({"a": 1})
        tracker.log_metrics({"m": 1.0}, step=2)
        tracker.set_tags({"t": "v"})
        with tracker.stage("train"):
            tracker.log_stage_metrics({"x": 1.0})
    assert list(tmp_path.iterdir()) == []  # no store was created

