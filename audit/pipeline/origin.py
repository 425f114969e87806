"""Where the tuned model comes from: one object per way, so the pipeline has no branch for it.

    audit run tiny/lora_cpu                                  # FreshBase: fine-tune the pretrained weights
    audit run tiny/clean_lora_cpu parent=runs/<that run>     # FurtherTune: fine-tune that run's tuned weights again
    audit measure gt/ --model out/                           # ExternalModel: load what someone else trained
    Trainer(..., callbacks=[CanaryAuditCallback("gt")])      # LiveTraining: what it saved, with the trainer's facts

Every difference between a first tune and a further tune (:mod:`audit.pipeline.chain`) lives here: which canaries are
measured (drawn now, or the parent's), which base scores stand (measured now, or the parent's, which measured those
very weights), which weights training starts from (the base, or the parent's chain merged in), which audit key the
secrets derive from (the one in use, or the parent's), how the lineage graph grows, the persistence metrics, and what
is recorded back in the parent. A model trained elsewhere (:mod:`audit.pipeline.measure`) is the third class,
:class:`ExternalModel`: its train stage loads the weights it was given instead of training. Training that ran live
under the Trainer callback (:mod:`audit.integrations.callback`) is the fourth, :class:`LiveTraining`: the weights it
saved measured
as an :class:`ExternalModel`, with the trainer's steps and loss, the curve, the callback's gates and MLflow run
(:class:`ReportInputs`), so the report is built once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from audit.core.errors import AuditError
from audit.core.keys import AuditKey, resolve_key
from audit.core.layout import LAYOUT
from audit.core.schema import AuditReport, GateSpec, LineageNode, MetricEntry, Recipe, SequenceScore, TrackingInfo
from audit.pipeline.resume import NEW_RUN, RunDir
from audit.train import stage
from audit.train.types import DeviceChoice, TrainPlan, TrainResult, WeightsLayer

if TYPE_CHECKING:  # annotations only (the pipeline's types; none is imported at run time from here)
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from audit.core.curves import Curves
    from audit.core.schema import CanarySet, WorkWindow
    from audit.data.ground_truth import GroundTruth
    from audit.pipeline.chain import ParentRun
    from audit.pipeline.external import GroundTruthDir
    from audit.report.tracking import RunTracker
    from audit.train.stage import StageContext


@dataclass(frozen=True)
class Persistence:
    """What a further tune measures on top of the suite: the summary for ``report.persistence`` and its metrics."""

    summary: dict[str, Any] | None = None
    metrics: dict[str, MetricEntry] | None = None


@dataclass(frozen=True)
class ReportInputs:
    """What :func:`audit.report.build_report` takes from an origin beside the stages' results: all empty but for training
    that ran live (:class:`LiveTraining`), whose curve, gates and MLflow run the callback brings."""

    curves: Curves | None = None
    """The memorization curves measured while training; None: those ``audit run`` kept in ``curves.json``."""
    gates: tuple[GateSpec, ...] = ()
    """Gates evaluated with the recipe's (the callback's ``gates=``; they may read the curves)."""
    tracking: TrackingInfo | None = None
    """The MLflow run the report belongs to when the pipeline itself does not track (the callback's own run)."""


class Origin(Protocol):
    recipe: Recipe
    """The recipe as this origin runs it (a further tune's inherits its parent's model, canaries and scoring)."""
    layers: list[WeightsLayer]
    """Saved weights put on the base before training (the parent's chain), in order; empty for a first tune."""
    further: bool
    """A further tune of an earlier run (the lineage labels its weights so)."""
    parent_run: str | None
    """The run whose tuned weights this tune starts from (``report.parent_run``)."""
    key: AuditKey | None
    """The audit key the canaries derive from (:func:`run_key`); None for a run written before the key existed."""
    report_inputs: ReportInputs
    """What the report takes from the origin beside the stages' results (:func:`audit.report.build_report`)."""

    def check(self, device: DeviceChoice) -> None: ...

    def ground_truth(self, *, model_path: Path, fingerprint: str, device: DeviceChoice, progress: bool) -> GroundTruth: ...

    def base_scores(self, score: Callable[[], list[SequenceScore]]) -> list[SequenceScore]: ...

    def base_works_scan(self, scan: Callable[[], list[WorkWindow]]) -> list[WorkWindow]:
        """The whole-work window rows that stand before training (``base``; a further tune's ``parent`` too)."""

    def train_artifact(self, ctx: StageContext, start: PreTrainedModel) -> stage.TrainedWeights | ExternalWeights:
        """The train stage's :class:`audit.core.store.Artifact` (``train.json``): read back on resume, written once."""

    def tuned_model(self, ctx: StageContext, start: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, truth: GroundTruth,
                    plan: TrainPlan, *, tracker: RunTracker,
                    progress: bool = False) -> TrainResult:
        """The train stage: fine-tune ``start`` (a first or further tune), or load what someone else trained."""

    def tuned_parents(self, base_node: LineageNode) -> list[LineageNode]: ...

    def lineage(self, base_node: LineageNode, data_node: LineageNode, tuned_node: LineageNode) -> list[LineageNode]: ...

    def persistence(self, scores: list[SequenceScore], metrics: dict[str, MetricEntry]) -> Persistence: ...

    def tags(self) -> dict[str, str]: ...

    def record(self, report: AuditReport, run_dir: Path) -> None: ...


def origin_for(recipe: Recipe, *, directory: RunDir = NEW_RUN) -> Origin:
    """:class:`FurtherTune` of ``recipe.parent`` when it names one (checked now), else :class:`FreshBase`; either with
    its audit key (:func:`run_key`), checked against the run being resumed (``directory``) and the parent before
    anything is written. A resumed ``audit measure`` run (its ``external.json``) is its :class:`ExternalModel` again."""
    if (external := directory.recorded(LAYOUT.external)) is not None:
        return resume_external(recipe, external.parent)
    if recipe.parent:
        from audit.pipeline import chain

        parent = chain.load_parent(recipe.parent)
        inherited = chain.inherit(recipe, parent)  # canaries.key_file included: the parent's key file
        key = run_key(inherited, expected=[(f"parent run {parent.origin.run_dir}", recorded_key_id(parent.origin.run_dir)),
                                           *_resumed(directory)])
        return FurtherTune(recipe=inherited, parent=parent, key=key)
    return FreshBase(recipe=recipe, key=run_key(recipe, expected=_resumed(directory)))

KEY_ID_FIELD = "key_id"


def recorded_key_id(run_dir: Path | str) -> str | None:
    """The audit key id a run directory was made under (run.json, else canaries.meta.json); ``"unkeyed"`` for a run
    written before the key existed (canaries.jsonl without any key id); None when it recorded nothing yet."""
    run_dir = Path(run_dir)
    for name in (LAYOUT.status, LAYOUT.canaries_meta):
        try:
            found = json.loads((run_dir / name).read_text(encoding="utf-8")).get(KEY_ID_FIELD)
        except (OSError, ValueError, AttributeError):
            continue
        if found:
            return str(found)
    return UNKEYED if (run_dir / LAYOUT.canaries).is_file() else None


UNKEYED = "unkeyed"


def _resumed(directory: RunDir) -> list[tuple[str, str | None]]:
    """The run being resumed with the audit key id it recorded; none for a new run."""
    return [(f"run {directory.path}", recorded_key_id(directory.path))] if directory.resuming else []


def run_key(recipe: Recipe, *, expected: list[tuple[str, str | None]] = ()) -> AuditKey | None:
    """The audit key for ``recipe`` (:func:`audit.core.keys.resolve_key`), which must be the one each ``expected`` run
    recorded: a run resumed, or the parent of a further tune. A run written before the key existed was unkeyed and is
    regenerated unkeyed (None), so its files come out byte for byte as they were."""
    recorded = [(what, key_id) for what, key_id in expected if key_id is not None]
    if any(key_id == UNKEYED for _, key_id in recorded):
        return None
    key = resolve_key(recipe.canaries.key_file)
    for what, key_id in recorded:
        if key_id != key.id:
            raise AuditError(f"{what} was made with audit key {key_id}, but the key in use ({key.source}) is {key.id}: "
                             "its canaries cannot be drawn again", fix="point $CANARY_AUDIT_KEY_FILE (or canaries.key_file) "
                             f"at the key file with id {key_id}, or start a new run (`audit key` prints the id in use)")
    return key


@dataclass(frozen=True)
class FreshBase:
    """A fine-tune of the pretrained weights: canaries drawn now, base scored now."""

    recipe: Recipe
    key: AuditKey | None = None
    layers: tuple[WeightsLayer, ...] = ()
    further: bool = False
    parent_run: str | None = None
    report_inputs = ReportInputs()

    def check(self, device: DeviceChoice) -> None:
        pass

    def ground_truth(self, *, model_path: Path, fingerprint: str, device: DeviceChoice, progress: bool) -> GroundTruth:
        from audit.data.ground_truth import ground_truth_for_model

        return ground_truth_for_model(self.recipe, model_path=model_path, fingerprint=fingerprint, device=device.device,
                                      dtype=device.torch_dtype, progress=progress, key=self.key)

    def base_scores(self, score: Callable[[], list[SequenceScore]]) -> list[SequenceScore]:
        return score()

    def base_works_scan(self, scan: Callable[[], list[WorkWindow]]) -> list[WorkWindow]:
        return scan()

    def train_artifact(self, ctx: StageContext, start: PreTrainedModel) -> stage.TrainedWeights | ExternalWeights:
        return stage.TrainedWeights(ctx, start)

    def tuned_model(self, ctx: StageContext, start: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, truth: GroundTruth,
                    plan: TrainPlan, *, tracker: RunTracker,
                    progress: bool = False) -> TrainResult:
        return stage.train(ctx, self.layers, start, tokenizer, truth, plan, tracker=tracker, progress=progress)

    def tuned_parents(self, base_node: LineageNode) -> list[LineageNode]:
        return [base_node]

    def lineage(self, base_node: LineageNode, data_node: LineageNode, tuned_node: LineageNode) -> list[LineageNode]:
        return [base_node, data_node, tuned_node]

    def persistence(self, scores: list[SequenceScore], metrics: dict[str, MetricEntry]) -> Persistence:
        return Persistence()

    def tags(self) -> dict[str, str]:
        return {}

    def record(self, report: AuditReport, run_dir: Path) -> None:
        pass


@dataclass(frozen=True)
class FurtherTune:
    """A further tune of an earlier run (:mod:`audit.pipeline.chain`): its canaries, its scores, its weights as the start."""

    recipe: Recipe
    parent: ParentRun
    """The :class:`audit.pipeline.chain.ParentRun`."""
    key: AuditKey | None = None
    """The chain's first run's key (checked by :func:`run_key`)."""
    further: bool = True
    report_inputs = ReportInputs()

    @property
    def parent_run(self) -> str:
        return str(self.parent.run_dir)

    @property
    def layers(self) -> list[WeightsLayer]:
        return [WeightsLayer(run.train.method, run.weights_dir) for run in self.parent.lineage_chain()]

    def check(self, device: DeviceChoice) -> None:
        from audit.pipeline import chain

        chain.check_same_device(self.parent, device=device.device, precision=device.precision)

    def ground_truth(self, *, model_path: Path, fingerprint: str, device: DeviceChoice, progress: bool) -> GroundTruth:
        """The parent's canaries and reference secrets, this recipe's corpus, the canaries planted only if asked.

        The chain's first run and the parent are read as ground truth (:func:`audit.pipeline.external.read_ground_truth_dir`).
        The canary set is the first run's (``canaries.jsonl`` + ``canaries.meta.json``), or, for a run written before
        the sidecar existed, regenerated from its recipe and seed; either way it must match the parent's
        ``canaries.jsonl`` row for row and the first run's recorded set hash.
        """
        from audit.data.ground_truth import ground_truth_for_model
        from audit.pipeline.external import read_ground_truth_dir

        first = self.parent.origin
        first_gt = read_ground_truth_dir(first.run_dir, chain_run=True)
        parent_gt = first_gt if self.parent is first else read_ground_truth_dir(self.parent.run_dir, chain_run=True)
        truth = ground_truth_for_model(self.recipe, model_path=model_path, fingerprint=fingerprint, device=device.device,
                                       dtype=device.torch_dtype, progress=progress,
                                       canaries=first_gt.canaries, canary_seed=first.recipe.seed, key=self.key)
        canaries = truth.canaries
        if (canaries.sha256() != first.report.canaries.canary_set_sha256
                or parent_gt.rows != [c.model_dump(mode="json") for c in canaries.canaries]):
            raise AuditError(f"the canaries of {first.run_dir} differ from those in {self.parent.run_dir}/canaries.jsonl",
                             fix="the canary code or spec changed since the parent ran; rerun the chain from its first run")
        if truth.works is not None:  # the same whole works, drawn again, as the chain's first run planted them
            planted = first_gt.manifest.model_dump(mode="json").get("work_subjects")
            if [w.model_dump(mode="json") for w in truth.works.subjects] != planted:
                raise AuditError(f"the whole works drawn again differ from those {first.run_dir}/manifest.json records",
                                 fix="the works sources, the canary code or the base model changed; "
                                     "rerun the chain from its first run")
        return truth

    def base_scores(self, score: Callable[[], list[SequenceScore]]) -> list[SequenceScore]:
        from audit.pipeline import chain

        return chain.inherited_scores(self.parent)  # base and parent weights as the parent runs measured them

    def base_works_scan(self, scan: Callable[[], list[WorkWindow]]) -> list[WorkWindow]:
        from audit.pipeline import chain

        return chain.inherited_works_scan(self.parent)

    def train_artifact(self, ctx: StageContext, start: PreTrainedModel) -> stage.TrainedWeights | ExternalWeights:
        return stage.TrainedWeights(ctx, start)

    def tuned_model(self, ctx: StageContext, start: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, truth: GroundTruth,
                    plan: TrainPlan, *, tracker: RunTracker,
                    progress: bool = False) -> TrainResult:
        return stage.train(ctx, self.layers, start, tokenizer, truth, plan, tracker=tracker, progress=progress)

    def tuned_parents(self, base_node: LineageNode) -> list[LineageNode]:
        return [self.parent.tuned_node()]

    def lineage(self, base_node: LineageNode, data_node: LineageNode, tuned_node: LineageNode) -> list[LineageNode]:
        from audit.pipeline import chain

        return chain.chain_lineage(self.parent, data_node, tuned_node)

    def persistence(self, scores: list[SequenceScore], metrics: dict[str, MetricEntry]) -> Persistence:
        """How much of the parent's canaries survived this tune (:func:`audit.pipeline.chain.persistence_summary`)."""
        from audit.pipeline import chain

        after = metrics.get("mia.auc/loss_diff")
        summary, kept = chain.persistence_summary(scores, self.parent, mia_after=after.value if after else None,
                                                  inject=self.recipe.canaries.inject)
        return Persistence(summary=summary, metrics=kept)

    def tags(self) -> dict[str, str]:
        tracking = self.parent.report.tracking
        return {"canary_audit.parent_mlflow_run": tracking.run_id} if tracking is not None else {}

    def record(self, report: AuditReport, run_dir: Path) -> None:
        """One line in the parent's ``children.jsonl``: this tune's weights node and its persistence metrics."""
        from audit.pipeline import chain

        tuned = [n for n in report.lineage if n.kind == "tuned_weights" and n.fingerprint == report.training.weights_fingerprint]
        kept = {k: v for k, v in report.metrics.items() if k.startswith("persistence.")}
        chain.record_child(self.parent, run_dir=run_dir, tuned_node=tuned[-1], metrics=kept)


def external_model(gt: GroundTruthDir, recipe: Recipe, *, model: str | None, adapter: str | None, base_given: bool,
                   progress: bool = False) -> ExternalModel:
    """:class:`ExternalModel` for the weights given, measured on the ground truth ``gt``
    (:class:`audit.pipeline.external.GroundTruthDir`): its audit key (the one the ground truth recorded), its secrets checked
    against their keyed ids, the weights checked (:func:`audit.pipeline.external.check_external_weights`). Nothing is written."""
    from audit.pipeline.external import check_external_weights

    key = ground_truth_key(gt)
    weights = check_external_weights(gt, recipe, model=model, adapter=adapter, base_given=base_given, progress=progress)
    assert gt.canaries is not None, "read without chain_run: canaries.meta.json is there"
    return ExternalModel(recipe=recipe, ground_truth_dir=gt.path, tuned_layers=weights.layers,
                         weights_fingerprint=weights.fingerprint, manifest_sha256=gt.manifest_sha256, canaries=gt.canaries,
                         key=key, details=weights.details, trainable_params=weights.trainable_params)


def ground_truth_key(gt: GroundTruthDir) -> AuditKey | None:
    """The audit key ``gt`` was made with: the key in use, which must have the id the directory recorded (None for a
    directory written before the key existed), and every stored secret the one its keyed id was made from (the set
    hash leaves secrets out)."""
    from audit.data.canaries.generate import check_ids

    key = run_key(gt.recipe, expected=[(f"ground-truth directory {gt.path}", recorded_key_id(gt.path))])
    assert gt.canaries is not None, "read without chain_run: canaries.meta.json is there"
    check_ids(gt.canaries, key)
    return key


def resume_external(recipe: Recipe, run_dir: Path) -> ExternalModel:
    """The :class:`ExternalModel` of an interrupted ``audit measure`` (``audit run --resume``), from its ``external.json``,
    checked again as when it started; the weights must still have the fingerprint recorded."""
    from audit.pipeline.external import read_ground_truth_dir

    try:
        record = json.loads((run_dir / LAYOUT.external).read_text(encoding="utf-8"))
        gt = read_ground_truth_dir(record["ground_truth_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        raise AuditError(f"{run_dir}/{LAYOUT.external} is damaged", fix="start a new `audit measure`") from None
    origin = external_model(gt, recipe, model=record.get("model"), adapter=record.get("adapter"), base_given=True)
    if origin.weights_fingerprint != record.get("weights_fingerprint"):
        raise AuditError(f"the weights {run_dir} measured changed since (fingerprint {origin.weights_fingerprint[:12]} != "
                         f"{str(record.get('weights_fingerprint'))[:12]})", fix="start a new `audit measure`")
    return origin


@dataclass(frozen=True)
class ExternalModel:
    """A model trained elsewhere (``audit measure``, :mod:`audit.pipeline.measure`): the canaries and injected set
    of a ground-truth
    directory (what ``audit inject`` wrote, or an earlier run), the base scored now, and a train stage that loads the
    weights it was given (``layers``: a merged model, an adapter on the base, or both) instead of training.

    Built by :func:`external_model`, which checks everything (ground truth, key, tokenizer, that the
    weights differ from the base) before the run directory exists.
    """

    recipe: Recipe
    ground_truth_dir: Path
    tuned_layers: tuple[WeightsLayer, ...]
    """What is put on the base to get the tuned model, in order (a ``full`` model replaces it; ``lora`` goes on top)."""
    weights_fingerprint: str
    """The tuned weights' fingerprint: the adapter's for a PEFT adapter, else the model's (as ``audit run`` records)."""
    manifest_sha256: str
    """The ground-truth directory's ``manifest.json``: the injected set the model is said to be trained on."""
    canaries: CanarySet
    """The ground-truth directory's canary set, as :func:`audit.pipeline.external.read_ground_truth_dir` read it."""
    key: AuditKey | None = None
    details: dict[str, Any] = field(default_factory=dict)
    """What ``external.json`` and the lineage record: the sources given, the model and tokenizer fingerprints."""
    trainable_params: int = 0
    layers: tuple[WeightsLayer, ...] = ()
    further: bool = False
    parent_run: str | None = None
    report_inputs = ReportInputs()

    def check(self, device: DeviceChoice) -> None:
        pass

    def ground_truth(self, *, model_path: Path, fingerprint: str, device: DeviceChoice, progress: bool) -> GroundTruth:
        """The ground-truth directory's canaries (checked against its manifest) with the corpus, injection, pre-flight and
        exposure references drawn again as ``audit inject`` drew them; the injection must reproduce its ``manifest.json``."""
        import dataclasses

        from audit.data.ground_truth import ground_truth_for_model

        truth = ground_truth_for_model(self.recipe, model_path=model_path, fingerprint=fingerprint, device=device.device,
                                       dtype=device.torch_dtype, progress=progress, canaries=self.canaries, key=self.key)
        found = truth.injection.manifest.sha256()
        if found != self.manifest_sha256:
            raise AuditError(f"the injection drawn again from {self.ground_truth_dir}/recipe.yaml differs from its manifest.json "
                             f"(manifest hash {found[:12]} != {self.manifest_sha256[:12]})",
                             fix="the corpus, the canary code or the base's tokenizer changed since `audit inject`; measure "
                                 "with the same version and corpus, or inject again and retrain")
        return dataclasses.replace(truth, extra_files={LAYOUT.external: self.record_file()})

    def record_file(self) -> dict[str, Any]:
        """``external.json``: what this run measured (no secret); :func:`resume_external` reads it back."""
        from audit.core.schema import SCHEMA_VERSION

        return {"schema_version": SCHEMA_VERSION, "ground_truth_dir": str(self.ground_truth_dir),
                "manifest_sha256": self.manifest_sha256, "weights_fingerprint": self.weights_fingerprint,
                "layers": [{"method": x.method, "path": str(x.path)} for x in self.tuned_layers], **self.details}

    @property
    def method(self) -> str:
        return self.tuned_layers[-1].method

    def base_scores(self, score: Callable[[], list[SequenceScore]]) -> list[SequenceScore]:
        return score()

    def base_works_scan(self, scan: Callable[[], list[WorkWindow]]) -> list[WorkWindow]:
        return scan()

    def train_artifact(self, ctx: StageContext, start: PreTrainedModel) -> stage.TrainedWeights | ExternalWeights:
        return ExternalWeights(origin=self, ctx=ctx, start=start)

    def tuned_model(self, ctx: StageContext, start: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, truth: GroundTruth,
                    plan: TrainPlan, *, tracker: RunTracker,
                    progress: bool = False) -> TrainResult:
        """The weights someone else trained, put on ``start`` (the base) by the one :func:`~audit.train.weights.load_tuned`."""
        import time

        from audit.core.console import say
        from audit.core.schema import TrainSummary
        from audit.data.models import weights_dtype
        from audit.train.weights import load_tuned

        say(progress, f"[audit] train: external ({self.method}); loading {', '.join(str(x.path) for x in self.tuned_layers)}")
        t = time.perf_counter()
        model = load_tuned(start, self.tuned_layers, device=ctx.device, trust_remote_code=ctx.recipe.model.trust_remote_code)
        total = sum(p.numel() for p in model.parameters())
        summary = TrainSummary(method=self.method, steps=0, final_loss=None, wall_s=round(time.perf_counter() - t, 3),
                               trainable_params=self.trainable_params or total, total_params=total, device=ctx.device.device,
                               precision=ctx.device.precision, gradient_checkpointing=False,
                               weights_path=str(self.tuned_layers[-1].path), weights_fingerprint=self.weights_fingerprint,
                               weights_dtype=weights_dtype(self.tuned_layers[-1].path))
        return TrainResult(model=model, summary=summary)

    def tuned_parents(self, base_node: LineageNode) -> list[LineageNode]:
        return [base_node]

    def lineage(self, base_node: LineageNode, data_node: LineageNode, tuned_node: LineageNode) -> list[LineageNode]:
        """Base -> injected data (the manifest's fingerprint) -> tuned weights, the last marked as trained elsewhere."""
        label = f"external {self.method} fine-tune (trained outside canary-audit)"
        details = {**tuned_node.details, "training": "external", "path": str(self.tuned_layers[-1].path),
                   **{k: v for k, v in self.details.items() if k in ("model", "model_path", "adapter", "model_fingerprint")}}
        return [base_node, data_node, tuned_node.model_copy(update={"label": label, "details": details})]

    def persistence(self, scores: list[SequenceScore], metrics: dict[str, MetricEntry]) -> Persistence:
        return Persistence()

    def tags(self) -> dict[str, str]:
        return {"canary_audit.training": "external", "canary_audit.ground_truth": str(self.ground_truth_dir)}

    def record(self, report: AuditReport, run_dir: Path) -> None:
        pass


@dataclass(frozen=True)
class ExternalWeights:
    """:class:`ExternalModel`'s train-stage artifact: ``train.json`` naming weights outside the run directory. Read back
    (a resumed ``audit measure``), the weights must still have the fingerprint recorded, and are loaded again."""

    origin: ExternalModel
    ctx: StageContext
    start: PreTrainedModel
    name: str = LAYOUT.train

    def read(self, run_dir: Path) -> TrainResult | None:
        from audit.core.schema import TrainSummary
        from audit.train.weights import load_tuned

        path = Path(run_dir) / self.name
        if not path.is_file():
            return None
        summary = TrainSummary.model_validate_json(path.read_text(encoding="utf-8"))
        if summary.weights_fingerprint != self.origin.weights_fingerprint:
            raise AuditError(f"{summary.weights_path} no longer holds the weights this run measured (fingerprint "
                             f"{self.origin.weights_fingerprint[:12]} != {summary.weights_fingerprint[:12]})",
                             fix="start a new `audit measure`")
        model = load_tuned(self.start, self.origin.tuned_layers, device=self.ctx.device,
                           trust_remote_code=self.ctx.recipe.model.trust_remote_code)
        return TrainResult(model=model, summary=summary)

    def write(self, run_dir: Path, value: TrainResult) -> None:
        from audit.core.store import json_text, write_once

        write_once(Path(run_dir) / self.name, json_text(value.summary))

    def describe(self, value: TrainResult) -> str:
        return f"external weights {self.origin.tuned_layers[-1].path}"


@dataclass(frozen=True)
class LiveTraining:
    """Training that ran in this process (:class:`audit.integrations.callback.CanaryAuditCallback`): the weights it
    saved, measured
    as ``audit measure`` measures them (``measured``: the canaries, base, loading and lineage of that
    :class:`ExternalModel`), with what only the trainer knows: its steps and last logged loss (in ``train.json`` and
    ``report.training``), the curve measured while it trained, the callback's gates and its MLflow run. The pipeline
    builds the report once from these (:func:`audit.report.build_report`); the saved weights are scored, not the live
    model, so the numbers are what a later ``audit measure`` of those weights gives and the trainer's model is left as
    training left it."""

    measured: ExternalModel
    steps: int
    final_loss: float | None
    curves: Curves
    """Key -> ``[(step, value), ...]`` measured during training (:class:`audit.train.curve_points.CurveRecorder`)."""
    gates: tuple[GateSpec, ...] = ()
    tracker: RunTracker | None = None
    """The callback's MLflow run (curve points logged as training went): the report goes there too, once written."""
    layers = ()  # the saved weights go on the base, as an ExternalModel's do; never a further tune
    further = False
    parent_run = None

    @property
    def recipe(self) -> Recipe:
        return self.measured.recipe

    @property
    def key(self) -> AuditKey | None:
        return self.measured.key

    @property
    def report_inputs(self) -> ReportInputs:
        return ReportInputs(curves=self.curves, gates=self.gates,
                            tracking=self.tracker.info() if self.tracker is not None else None)

    def check(self, device: DeviceChoice) -> None:
        self.measured.check(device)

    def ground_truth(self, *, model_path: Path, fingerprint: str, device: DeviceChoice, progress: bool) -> GroundTruth:
        return self.measured.ground_truth(model_path=model_path, fingerprint=fingerprint, device=device, progress=progress)

    def base_scores(self, score: Callable[[], list[SequenceScore]]) -> list[SequenceScore]:
        return self.measured.base_scores(score)

    def base_works_scan(self, scan: Callable[[], list[WorkWindow]]) -> list[WorkWindow]:
        return self.measured.base_works_scan(scan)

    def train_artifact(self, ctx: StageContext, start: PreTrainedModel) -> stage.TrainedWeights | ExternalWeights:
        return self.measured.train_artifact(ctx, start)

    def tuned_model(self, ctx: StageContext, start: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, truth: GroundTruth,
                    plan: TrainPlan, *, tracker: RunTracker,
                    progress: bool = False) -> TrainResult:
        """The saved weights loaded as ``audit measure`` loads them, summarized with the trainer's steps and loss."""
        import dataclasses

        loaded = self.measured.tuned_model(ctx, start, tokenizer, truth, plan, tracker=tracker, progress=progress)
        assert loaded.summary is not None, "the callback audits on the main process only"
        return dataclasses.replace(loaded, summary=loaded.summary.model_copy(
            update={"steps": self.steps, "final_loss": self.final_loss}))

    def tuned_parents(self, base_node: LineageNode) -> list[LineageNode]:
        return self.measured.tuned_parents(base_node)

    def lineage(self, base_node: LineageNode, data_node: LineageNode, tuned_node: LineageNode) -> list[LineageNode]:
        return self.measured.lineage(base_node, data_node, tuned_node)

    def persistence(self, scores: list[SequenceScore], metrics: dict[str, MetricEntry]) -> Persistence:
        return self.measured.persistence(scores, metrics)

    def tags(self) -> dict[str, str]:
        return self.measured.tags()

    def record(self, report: AuditReport, run_dir: Path) -> None:
        """The report, as written, into the callback's MLflow run (the final audit at the curve's last step)."""
        self.measured.record(report, run_dir)
        if self.tracker is not None:
            self.tracker.log_report(report, run_dir)
