"""run_audit's sequencing with fake stages: no model, no torch work, a real run directory and a real stage store.

The fakes replace only what computes (model loads, scoring, training, the report's numbers); the StageStore,
the run directory's lock and status, the NullTracker, the Origin and the TrainPlan hand-over (which stages a worker joins)
are the real ones. A worker (a process other than rank 0 of a distributed run) runs the same ``run_origin``; its store
is a view of rank 0's plan.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from audit import report as report_module
from audit.core.schema import PreflightReport, Recipe, SequenceScore, TrainSummary
from audit.data.canaries import generate_canaries, load_spec
from audit.data.corpus import builtin_records
from audit.data.ground_truth import GroundTruth
from audit.data.inject import inject
from audit.data.models import ResolvedModel
from audit.pipeline import origin as origin_module
from audit.pipeline import run_audit, run_origin, stages
from audit.train import distributed
from audit.train import stage as train_stage
from audit.train.types import DeviceChoice, TrainPlan, TrainResult, WeightsLayer


class Boom(RuntimeError):
    pass


@dataclass
class Fakes:
    """What ran, in order, and where to fail."""

    calls: list[str] = field(default_factory=list)
    fail_at: str | None = None
    plans: list = field(default_factory=list)
    loaded: list = field(default_factory=list)
    trackers: list = field(default_factory=list)
    main_only: list[str] = field(default_factory=list)
    """What rank 0 alone computes and that writes no stage file of its own (token views, calibration)."""

    def step(self, name: str) -> None:
        if name == self.fail_at:
            raise Boom(f"killed in {name}")
        self.calls.append(name)


def _truth() -> GroundTruth:
    canaries = generate_canaries(load_spec("digits"), seed=0)
    injection = inject(builtin_records("notes", n=20, seed=0), canaries, seed=0)
    preflight = PreflightReport(placements_checked=len(injection.manifest.placements), max_length=64, loss="all tokens",
                                packing="none", canary_tokens_max=20, record_tokens_max=40)
    return GroundTruth(spec=load_spec("digits"), canaries=canaries, corpus_format="text", injection=injection,
                       preflight=preflight, training_texts=["a", "b"], reference_secrets=["123456", "654321"])


TRUTH = _truth()
REAL_BUILD_REPORT, REAL_PUBLISH = report_module.build_report, stages.publish


def _rows(label: str) -> list[SequenceScore]:
    return [SequenceScore(canary_id=c.id, model=label, repetitions=c.repetitions, secret_tokens=6, secret_nll_bits=20.0,
                          rank=1, n_references=2, exposure=1.0, extracted=False) for c in TRUTH.canaries.canaries]


@pytest.fixture
def fakes(tmp_path, monkeypatch) -> Fakes:
    f = Fakes()
    recipe = Recipe(name="fake/seq", output={"root": str(tmp_path / "runs")}, tracking={"enabled": False})

    def prepare(origin, **kwargs):
        return stages.RunContext(recipe=origin.recipe, resolved=ResolvedModel(source="fake", kind="local", path=tmp_path,
                                                                              provenance={"weights_fingerprint": "b" * 64}),
                                 device=DeviceChoice("cpu", "fp32", False), tracking=False, tracking_uri="",
                                 progress=kwargs.get("progress", False))

    def ground_truth(self, origin):
        self.timings["inject"] = 0.0
        return TRUTH

    def train(ctx, layers, model, tokenizer, truth, plan, **kwargs):
        f.step("train")
        f.plans.append(plan)
        f.trackers.append(kwargs["tracker"])
        plan.weights_dir.mkdir(parents=True, exist_ok=True)
        summary = TrainSummary(method="lora", steps=3, final_loss=1.0, wall_s=0.1, trainable_params=1, total_params=2,
                               device="cpu", precision="fp32", gradient_checkpointing=False,
                               weights_path=str(plan.weights_dir), weights_fingerprint="t" * 64)
        return TrainResult(model=("tuned", model), summary=summary)

    def score(ctx, model, tokenizer, truth, label):
        f.step(f"score_{label}")
        return _rows(label)

    def build_report(**kw):
        f.step("report")
        return {"scores": len(kw["scores"]), "origin": type(kw["origin"]).__name__}

    monkeypatch.setattr(origin_module, "origin_for", lambda r, **_: origin_module.FreshBase(recipe=r))
    monkeypatch.setattr(stages.RunContext, "prepare", classmethod(lambda cls, origin, **kw: prepare(origin, **kw)))
    monkeypatch.setattr(stages.RunContext, "ground_truth", ground_truth)
    monkeypatch.setattr(stages, "load_base", lambda ctx: (f.calls.append("load_base") or "base-model", "tokenizer"))
    monkeypatch.setattr(stages, "token_view", lambda ctx, model, tok, truth: f.main_only.append("token_view"))
    monkeypatch.setattr(stages, "calibrate", lambda ctx, model, tok, truth, label: f.main_only.append(f"calibrate_{label}"))
    monkeypatch.setattr(stages, "write_token_view", lambda *a: None)
    monkeypatch.setattr(stages, "seed_torch", lambda seed: None)
    monkeypatch.setattr(stages, "score", score)
    monkeypatch.setattr(train_stage, "train", train)
    monkeypatch.setattr(stages, "publish", lambda run, origin, report: (f.step("publish"), report)[1])  # returns what it wrote
    monkeypatch.setattr(report_module, "build_report", build_report)
    # the stored weights: the fingerprint train.json records, loaded by the one load_tuned
    import audit.data.models
    import audit.train.weights

    monkeypatch.setattr(audit.data.models, "fingerprint_safetensors_dir", lambda path: "t" * 64)

    def load_tuned(base, layers, **kw):
        f.loaded.append((base, [(layer.method, Path(layer.path).name) for layer in layers], kw.get("keep_last_adapter", True)))
        return ("from-disk", base)

    monkeypatch.setattr(audit.train.weights, "load_tuned", load_tuned)
    f.recipe = recipe  # type: ignore[attr-defined]
    return f


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def test_a_fresh_run_runs_every_stage_once_in_order_with_tracking_off(fakes):
    result = run_audit(fakes.recipe, tracking=False, progress=False)
    assert fakes.calls == ["load_base", "score_base", "train", "score_tuned", "report", "publish"]
    run_dir = result.run_dir
    assert _status(run_dir)["status"] == "complete" and _status(run_dir)["schema_version"] >= 1
    assert "mlflow_run_id" not in _status(run_dir)  # the NullTracker has no run
    for name in ("recipe.yaml", "canaries.jsonl", "canaries.meta.json", "manifest.json", "scores_base.jsonl",
                 "train.json", "scores_tuned.jsonl", "scores.jsonl"):
        assert (run_dir / name).is_file(), name
    (plan,) = fakes.plans
    assert plan.run_dir == run_dir and plan.train and plan.checkpoint is None and plan.weights_dir == run_dir / "adapter"
    assert result.report == {"scores": 2 * len(TRUTH.canaries.canaries), "origin": "FreshBase"}
    assert fakes.loaded == []  # freshly trained weights are used as they are, not reloaded


def test_live_training_is_one_origin_whose_report_is_built_gated_and_written_once(fakes, monkeypatch):
    """The Trainer callback's final audit (:class:`audit.pipeline.origin.LiveTraining`): the trainer's steps and loss in
    train.json and the report, its curve closed at the last step, its gates beside the recipe's, evaluated once on
    that curve, report.json written once, and the report logged to the callback's MLflow run; nothing patched after."""
    import audit.core.gates
    from audit.core.schema import GateSpec, TrackingInfo
    from audit.pipeline import run_origin
    from audit.pipeline.origin import LiveTraining, ReportInputs

    monkeypatch.setattr(report_module, "build_report", REAL_BUILD_REPORT)
    monkeypatch.setattr(stages, "publish", REAL_PUBLISH)
    monkeypatch.setattr("audit.report.render.render_report", lambda run_dir, report: fakes.calls.append("render"))
    counted = {"write_report": 0, "evaluate_gates": 0}

    def count(name, real):
        def call(*args, **kwargs):
            counted[name] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(report_module, "write_report", count("write_report", report_module.write_report))
    monkeypatch.setattr(audit.core.gates, "evaluate_gates", count("evaluate_gates", audit.core.gates.evaluate_gates))

    class CallbackRun:  # the callback's MLflow run, opened at train begin
        def __init__(self):
            self.logged = []

        def info(self):
            return TrackingInfo(uri="sqlite:///m.db", experiment_id="1", run_id="cb", ui_command="mlflow ui")

        def log_report(self, report, run_dir, **kwargs):
            self.logged.append((report.gates, run_dir))

    key = f"exposure.mean/rep_{TRUTH.canaries.members()[0].repetitions}/tuned"
    tracker = CallbackRun()
    origin = LiveTraining(measured=origin_module.FreshBase(recipe=fakes.recipe), steps=7, final_loss=0.25,
                          curves={key: [(2, 1.5), (4, 30.0)]}, tracker=tracker,
                          gates=(GateSpec(metric=key, of="max", max=10.0),))
    assert origin_module.FreshBase(recipe=fakes.recipe).report_inputs == ReportInputs()
    result = run_origin(origin, tracking=False, progress=False)
    report = result.report
    assert fakes.calls == ["load_base", "score_base", "train", "score_tuned", "render"]
    assert counted == {"write_report": 1, "evaluate_gates": 1}
    assert (report.training.steps, report.training.final_loss) == (7, 0.25)
    stored = TrainSummary.model_validate_json((result.run_dir / "train.json").read_text())
    assert (stored.steps, stored.final_loss) == (7, 0.25)  # train.json says what the report says
    assert report.curves[key] == [(2, 1.5), (4, 30.0), (7, report.flat_metrics()[key].value)]
    (gate,) = [g for g in report.gates if g.metric == key]
    assert gate.status == "fail" and gate.value == 30.0  # the max over the curve, not the final value
    assert report.tracking.run_id == "cb" and tracker.logged == [(report.gates, result.run_dir)]
    assert report_module.read_report(result.run_dir / "report.json") == report


@pytest.mark.parametrize("killed_in", ["score_base", "train", "score_tuned", "report"])
def test_a_run_killed_in_any_stage_resumes_reusing_every_stage_before_it(fakes, killed_in):
    fakes.fail_at = killed_in
    with pytest.raises(Boom):
        run_audit(fakes.recipe, tracking=False, progress=False)
    (run_dir,) = (Path(fakes.recipe.output.root)).iterdir()
    assert _status(run_dir)["status"] == "failed" and killed_in in _status(run_dir)["error"]
    before = list(fakes.calls)

    fakes.fail_at = None
    fakes.calls.clear()
    result = run_audit(fakes.recipe, tracking=False, progress=False, resume_dir=run_dir)
    order = ["score_base", "train", "score_tuned", "report"]
    assert [c for c in before if c in order] == order[: order.index(killed_in)]
    assert [c for c in fakes.calls if c in order] == order[order.index(killed_in):]  # only what was not stored runs
    assert result.run_dir == run_dir and _status(run_dir)["status"] == "complete"
    assert len(_status(run_dir)["resumes"]) == 1
    if order.index(killed_in) > order.index("train"):  # the stored weights went back onto the start model
        assert fakes.loaded == [("base-model", [("lora", "adapter")], True)]
        assert len(fakes.plans) == 1  # trained once; the resumed attempt's plan said: nothing to train


def test_whether_a_run_resumes_is_decided_once_by_its_run_directory_and_every_stage_asks_it(fakes, monkeypatch):
    """origin_for, RunContext.prepare and the open run see one RunDir: not resuming for a new run, resuming the
    directory given for a resume; the stages then only ask it (or the store), never a ``resume_dir``."""
    seen: list[tuple[str, bool]] = []

    def origin_for(recipe, *, directory):
        seen.append(("origin", directory.resuming))
        return origin_module.FreshBase(recipe=recipe)

    prepare = stages.RunContext.prepare
    monkeypatch.setattr(origin_module, "origin_for", origin_for)
    monkeypatch.setattr(stages.RunContext, "prepare", classmethod(
        lambda cls, origin, *, directory, **kw: (seen.append(("prepare", directory.resuming)), prepare(origin))[1]))
    monkeypatch.setattr(stages, "publish", lambda run, origin, report: (seen.append(("handle", run.handle.resumed)), report)[1])

    result = run_audit(fakes.recipe, tracking=False, progress=False)
    assert seen == [("origin", False), ("prepare", False), ("handle", False)]
    (result.run_dir / "report.json").unlink(missing_ok=True)
    seen.clear()
    again = run_audit(fakes.recipe, tracking=False, progress=False, resume_dir=result.run_dir)
    assert seen == [("origin", True), ("prepare", True), ("handle", True)] and again.run_dir == result.run_dir
    assert len(list(Path(fakes.recipe.output.root).iterdir())) == 1  # the resume made no new run directory


def test_rank_0_refuses_a_process_that_drew_other_canaries_before_writing_the_canaries(fakes, monkeypatch):
    """Rank 0 hears, with the plan, that process 1 drew under another key: the run fails in one line with nothing
    but run.json written (no canaries, no manifest), and nothing was loaded, scored or trained."""
    from audit.core.errors import AuditError

    real = distributed.share_plan
    monkeypatch.setattr(distributed, "share_plan",
                        lambda make, own: (real(make, own=own)[0], [own, ("0123456789abcdef", own[1])]))
    with pytest.raises(AuditError, match="process 1 drew other canaries than rank 0: audit key 0123456789abcdef"):
        run_audit(fakes.recipe, tracking=False, progress=False)
    (run_dir,) = Path(fakes.recipe.output.root).iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == [".run.lock", "run.json"] and _status(run_dir)["status"] == "failed"
    assert fakes.calls == []


def test_a_resumed_run_whose_stored_file_differs_stops_and_keeps_the_file(fakes):
    result = run_audit(fakes.recipe, tracking=False, progress=False)
    (result.run_dir / "manifest.json").write_text("{}\n")
    from audit.core.errors import AuditError

    with pytest.raises(AuditError, match="already exists with different content"):
        run_audit(fakes.recipe, tracking=False, progress=False, resume_dir=result.run_dir)
    assert (result.run_dir / "manifest.json").read_text() == "{}\n"


def test_a_further_tune_inherits_base_scores_and_trains_from_the_merged_parent(fakes, monkeypatch, tmp_path):
    parent_rows = _rows("base") + _rows("parent")

    @dataclass(frozen=True)
    class FakeFurtherTune(origin_module.FreshBase):
        layers: tuple = (WeightsLayer("lora", tmp_path / "parent" / "adapter"),)
        further: bool = True

        def base_scores(self, score):
            return parent_rows  # the parent measured these weights already: nothing is scored

    monkeypatch.setattr(origin_module, "origin_for", lambda r, **_: FakeFurtherTune(recipe=r))
    result = run_audit(fakes.recipe, tracking=False, progress=False)
    assert "score_base" not in fakes.calls and fakes.calls.count("score_tuned") == 1
    assert fakes.loaded == [("base-model", [("lora", "adapter")], False)]  # the parent's adapter merged in, not kept
    stored = [SequenceScore.model_validate_json(x) for x in (result.run_dir / "scores_base.jsonl").read_text().splitlines()]
    assert stored == parent_rows
    assert fakes.plans[0].train and result.report["origin"] == "FakeFurtherTune"


def _as_worker(monkeypatch, plan) -> list:
    """This process is a worker of a distributed run that receives ``plan``: what it was sent, in order."""
    received: list = []

    def share_plan(make, own=None):
        assert make is None  # a worker never makes the plan
        received.append(plan)
        return plan, [own, own]

    monkeypatch.setattr(distributed, "is_main", lambda: False)
    monkeypatch.setattr(distributed, "share_plan", share_plan)
    return received


def _worker_run(recipe: Recipe, *, progress: bool = False):
    """What `audit run` does on a worker: the one ``run_origin`` every process runs, for the same origin."""
    return run_origin(origin_module.origin_for(recipe), tracking=False, progress=progress)


def test_a_worker_process_scores_and_trains_as_the_plan_rank_0_sends_says_and_writes_nothing(fakes, monkeypatch, capsys):
    result = run_audit(fakes.recipe, tracking=False, progress=False)  # rank 0: its plan is the one message
    (sent,) = fakes.plans
    assert sent.score_base and sent.train and sent.score_tuned  # a fresh run: every stage to run, on every process
    assert fakes.main_only == ["token_view", "calibrate_base", "calibrate_tuned", "token_view"]
    assert [type(t).__name__ for t in fakes.trackers] == ["NullTracker"]  # tracking off: a NullTracker, never None
    files = sorted(p.name for p in result.run_dir.iterdir())
    received = _as_worker(monkeypatch, sent)
    fakes.calls.clear()
    fakes.main_only.clear()
    capsys.readouterr()
    assert _worker_run(fakes.recipe, progress=True) is None
    # the same stages as rank 0 up to tuned scoring, in its order; no report, no publish
    assert received == [sent] and fakes.calls == ["load_base", "score_base", "train", "score_tuned"]
    assert fakes.main_only == []  # token views and calibration are rank 0's alone
    assert fakes.plans[-1] is sent and fakes.plans[-1].run_dir == result.run_dir
    assert [type(t).__name__ for t in fakes.trackers] == ["NullTracker", "NullTracker"]  # the worker logs nothing
    assert capsys.readouterr().out == ""  # and prints nothing, though asked for progress: rank 0 alone prints
    assert sorted(p.name for p in result.run_dir.iterdir()) == files  # rank 0 alone writes
    assert len(list(Path(fakes.recipe.output.root).iterdir())) == 1  # and no run directory of its own


def test_a_worker_of_a_run_resumed_with_every_stage_stored_leaves_at_once(fakes, monkeypatch):
    """Nothing to wait for: had the worker waited in a scoring gather rank 0 never enters, the run would hang."""
    result = run_audit(fakes.recipe, tracking=False, progress=False)
    status = json.loads((result.run_dir / "run.json").read_text())
    (result.run_dir / "run.json").write_text(json.dumps({**status, "status": "failed"}))
    (result.run_dir / "report.json").unlink(missing_ok=True)
    fakes.calls.clear()
    fakes.plans.clear()
    sent: list = []
    real = distributed.share_plan
    monkeypatch.setattr(distributed, "share_plan", lambda make, own: sent.append(real(make, own=own)[0]) or (sent[-1], [own]))
    run_audit(fakes.recipe, tracking=False, progress=False, resume_dir=result.run_dir)  # rank 0 resumes
    (plan,) = sent
    assert not (plan.score_base or plan.train or plan.score_tuned)  # all three stage files are stored
    assert "score_base" not in fakes.calls and "train" not in fakes.calls and "score_tuned" not in fakes.calls

    _as_worker(monkeypatch, plan)
    fakes.calls.clear()
    fakes.loaded.clear()
    fakes.main_only.clear()
    assert _worker_run(fakes.recipe) is None
    assert fakes.calls == ["load_base"] and fakes.loaded == [] and fakes.main_only == []  # no stored weights read back


def test_a_worker_of_a_run_resumed_after_training_reloads_the_stored_weights_and_scores_them(fakes, monkeypatch):
    run_audit(fakes.recipe, tracking=False, progress=False)
    plan = dataclasses.replace(fakes.plans[0], train=False, score_base=False)  # train.json stored, scores not
    _as_worker(monkeypatch, plan)
    fakes.calls.clear()
    assert _worker_run(fakes.recipe) is None
    assert fakes.calls == ["load_base", "score_tuned"]
    assert fakes.loaded == [("base-model", [("lora", "adapter")], True)]  # the stored adapter, as rank 0 puts it back


def test_a_worker_of_a_further_tune_scores_no_base_as_its_origin_inherits_the_base_scores(fakes, monkeypatch, tmp_path):
    @dataclass(frozen=True)
    class FakeFurtherTune(origin_module.FreshBase):
        further: bool = True

        def base_scores(self, score):
            return _rows("base")  # inherited: score() is never called, on rank 0 or on a worker

    monkeypatch.setattr(origin_module, "origin_for", lambda r, **_: FakeFurtherTune(recipe=r))
    key_id, digest = stages.drawn(TRUTH)
    plan = TrainPlan(run_dir=tmp_path / "runs" / "r", train=True, score_base=True, score_tuned=True, key_id=key_id,
                     canary_set_sha256=digest)
    _as_worker(monkeypatch, plan)
    assert _worker_run(fakes.recipe) is None
    assert fakes.calls == ["load_base", "train", "score_tuned"]


def _no_collectives(monkeypatch):
    """torch.distributed calls that must not happen: each raises."""
    import torch.distributed as dist

    def refuse(*args, **kwargs):
        raise AssertionError("a collective call or a process-group teardown inside distributed.alone()")

    for name in ("all_gather_object", "barrier", "destroy_process_group"):
        monkeypatch.setattr(dist, name, refuse)


def test_a_pipeline_run_alone_under_a_launch_of_two_makes_no_collective_call_and_keeps_the_group(fakes, monkeypatch):
    """The callback's final audit runs on rank 0 by itself after a DDP training (WORLD_SIZE=2): inside
    ``distributed.alone()`` it is a one-process run; the plan message and ``finish()`` would wait for ranks that are
    not in it, or destroy the process group the Trainer still owns."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    _no_collectives(monkeypatch)
    assert distributed.is_distributed()
    with distributed.alone():
        assert not distributed.is_distributed() and distributed.is_main()
        result = run_audit(fakes.recipe, tracking=False, progress=False)
    assert result is not None and fakes.calls[:4] == ["load_base", "score_base", "train", "score_tuned"]
    assert distributed.is_distributed()  # the launch is several processes again after it


def test_the_callbacks_final_audit_runs_alone(monkeypatch, tmp_path):
    """Under DDP only rank 0 reaches on_train_end: its pipeline run is inside ``distributed.alone()``."""
    import audit.pipeline
    import audit.pipeline.measure
    import audit.pipeline.origin
    from audit.integrations.callback import CanaryAuditCallback

    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = []

    class Done:
        run_dir = tmp_path
        report = type("R", (), {"gates": []})()

    monkeypatch.setattr(audit.pipeline.measure, "measured_model", lambda truth, **kwargs: None)
    monkeypatch.setattr(audit.pipeline.origin, "LiveTraining", lambda **kwargs: "live")
    monkeypatch.setattr(audit.pipeline, "run_origin",
                        lambda origin, **kwargs: seen.append((origin, distributed.is_distributed())) or Done())
    callback = object.__new__(CanaryAuditCallback)
    callback.__dict__.update(truth=TRUTH, out_root=tmp_path, progress=False, recorder=None, extra_gates=[], _tracker=None)
    state = type("State", (), {"global_step": 4, "log_history": [{"loss": 1.0}]})()
    assert callback._final_audit({}, state) is not None
    assert seen == [("live", False)]
