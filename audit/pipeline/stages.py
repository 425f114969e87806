"""The stages :func:`audit.pipeline.run_audit` sequences, and the context they share.

    RunContext.prepare   validate and resolve everything the user controls; nothing is written yet
    open_run             the run directory: lock, ``run.json``, the stage store, the tracker (a NullTracker when off),
                         and rank 0's plan shared; on the other processes of a distributed run a view of rank 0's run
    record_inputs        recipe.yaml, canaries.jsonl (+ .meta.json), manifest.json, preflight.json: written once
    train_plan           the one message to the other processes of a distributed run: which stages they join, and
                         which canaries (every process refuses when one drew others: share_plan)
    load_base / score    the base model and the scoring engine (every process takes a share: audit.score.sharded)
    train                TRL training (or the stored weights)
    sample_outputs       the generated-outputs scan (off unless ``outputs.samples`` > 0)
    publish              report.json/html/md, MLflow, and what the origin records back in its parent

Resume is not here: a stage's artifact (:class:`audit.core.store.ScoresFile`, :class:`TrainedWeights`) is reused by the
:class:`audit.core.store.StageStore` when it is on disk. Where the tuned model comes from is not here either: that is the
:class:`audit.pipeline.origin.Origin`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from audit.core.console import say
from audit.core.layout import LAYOUT
from audit.core.schema import AuditReport, Recipe, SequenceScore, TrainSummary
from audit.core.store import PlanView, StageStore, json_text
from audit.data.models import ResolvedModel
from audit.pipeline.resume import NEW_RUN, RunDir, RunHandle
from audit.train import distributed
from audit.train.stage import TrainedWeights, load_base  # noqa: F401  (re-exported: the stage the run opens with)
from audit.train.types import DeviceChoice, TrainPlan

if TYPE_CHECKING:  # annotations only: the origins import this module's stages lazily, so no cycle at import time
    from contextlib import AbstractContextManager

    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from audit.core.schema import CalibrationSummary, WorkWindow
    from audit.data.ground_truth import GroundTruth
    from audit.data.works.summary import WholeWorksResult
    from audit.pipeline.origin import Origin
    from audit.report.render.token_view import CanaryTokens
    from audit.report.tracking import RunTracker
    from audit.score.backend import ScoringBackend
    from audit.score.outputs import OutputsResult


@dataclass
class RunContext:
    """What every stage reads: the recipe as it runs, the resolved model, the device; and the stage timings."""

    recipe: Recipe
    resolved: ResolvedModel
    device: DeviceChoice
    tracking: bool
    tracking_uri: str
    progress: bool = True
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    tracking_down: str | None = None
    """Set when a resume found its tracking server unreachable: the run goes on, what it logs is kept for replay."""

    @classmethod
    def prepare(cls, origin: Origin, *, tracking_uri: str | None = None, tracking: bool | None = None,
                progress: bool = True, directory: RunDir = NEW_RUN) -> RunContext:
        """Check everything the user can get wrong (spec, output folder, device, tracking server, model, LoRA
        targets) before anything is written.

        A resume whose tracking server does not answer is not refused (a new run is): the audit's files are in the
        run directory, and what MLflow misses is kept in ``tracking_pending.jsonl`` for ``audit sync``."""
        from audit.core.errors import AuditError
        from audit.data.canaries import load_spec
        from audit.data.models import resolve_model
        from audit.data.validate import check_lora_targets, check_sqlite_store
        from audit.report.tracking import check_tracking_reachable, resolve_tracking_uri
        from audit.score.backend import check_backend
        from audit.train.sft import choose_device

        started = time.perf_counter()
        recipe = origin.recipe
        load_spec(recipe.canaries.spec, recipe.canaries.params)  # a bad spec name fails before any model work
        check_backend(recipe.scoring.backend)  # so does a scoring backend that does not exist
        directory.check(recipe)  # where the run directory will be made, or the run directory resumed
        if recipe.works is not None and distributed.is_distributed():
            raise AuditError("whole works (the recipe's works section) are scanned in one process: a sharded model cannot "
                             "run the window scan on the main process alone", fix="run `audit run` without accelerate "
                             "launch / torchrun, or drop the works section")
        device = choose_device(recipe.training)
        check_whole_model_per_process()
        origin.check(device)
        use_tracking = recipe.tracking.enabled if tracking is None else tracking
        uri = resolve_tracking_uri(tracking_uri or recipe.tracking.uri)
        down = None
        if use_tracking:
            try:
                check_tracking_reachable(uri)
            except AuditError as exc:
                if not directory.resuming or not uri.startswith(("http://", "https://")):
                    raise
                down = exc.problem  # the tracker says so in one warning line when its first call fails
            check_sqlite_store(uri)
        resolved = resolve_model(recipe.model.source, revision=recipe.model.revision, progress=progress,
                                 allow_pickle=recipe.model.allow_pickle, trust_remote_code=recipe.model.trust_remote_code)
        check_lora_targets(recipe, resolved.path)  # PEFT would fail on a typo only inside the trainer, after base scoring
        ctx = cls(recipe=recipe, resolved=resolved, device=device, tracking=use_tracking, tracking_uri=uri,
                  progress=progress, started=started, tracking_down=down)
        ctx.timings["resolve"] = time.perf_counter() - started
        return ctx

    @cached_property
    def added_tokens(self) -> list[str]:
        """Tokens the canary spec adds to the vocabulary (``new_tokens``); [] for every other spec (read once)."""
        from audit.data.canaries import added_tokens, load_spec

        return added_tokens(load_spec(self.recipe.canaries.spec, self.recipe.canaries.params))

    @property
    def base_fingerprint(self) -> str:
        fp = self.resolved.provenance.get("weights_fingerprint")
        if fp is None:
            from audit.data.models import fingerprint_safetensors_dir

            fp = fingerprint_safetensors_dir(self.resolved.path)
        return fp

    def ground_truth(self, origin: Origin) -> GroundTruth:
        """Canaries + inject + pre-flight (:mod:`audit.data.ground_truth`), timed as the ``inject`` stage."""
        t = time.perf_counter()
        truth = origin.ground_truth(model_path=self.resolved.path,
                                    fingerprint=self.resolved.provenance.get("weights_fingerprint", ""),
                                    device=self.device, progress=self.progress)
        self.timings["inject"] = time.perf_counter() - t
        return truth


def check_whole_model_per_process() -> None:
    """Refuse accelerate's ``fsdp_cpu_ram_efficient_loading`` in a distributed run, before anything is loaded.

    With it on, transformers reads the weights on local rank 0 only and gives every other process empty (meta) tensors
    for FSDP to fill at sharding time; but every process first scores a share of the base with its own whole model
    (:mod:`audit.score.sharded`), and would score empty weights. The audit reads each model straight onto its GPU
    instead (:func:`audit.data.models.load_causal_lm`), so host memory never holds it whole."""
    import os

    from audit.core.errors import AuditError

    if distributed.is_distributed() and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").strip().lower() in {
            "1", "true", "yes", "y", "on", "t"}:
        raise AuditError("fsdp_cpu_ram_efficient_loading is on: every process but local rank 0 would load empty weights, "
                         "and every process scores the base with its own whole copy of the model",
                         fix="set fsdp_cpu_ram_efficient_loading: false in the accelerate config (recipes/accelerate/fsdp.yaml)")


@dataclass(frozen=True)
class RankView:
    """Rank 0's run directory as the other processes of a distributed run hold it: where it is, whether it resumes,
    and rank 0's decisions (:class:`~audit.core.store.PlanView`). No lock and no ``run.json``: rank 0 keeps those."""

    run_dir: Path
    resumed: bool
    store: PlanView

    def save_status(self, **updates: object) -> None:
        pass


@dataclass
class Run:
    """An open run directory: its handle (lock, status), its stage store, its tracker and the plan every process got."""

    ctx: RunContext
    handle: RunHandle | RankView
    """:class:`audit.pipeline.resume.RunHandle` on rank 0; :class:`RankView` on the other processes of a distributed run."""
    tracker: RunTracker
    """:class:`audit.report.tracking.Tracker`, or :class:`audit.report.tracking.NullTracker` when tracking is off (and on
    the others)."""
    plan: TrainPlan
    """Rank 0's :func:`train_plan`, the one message of a distributed run (:func:`share_plan`)."""

    @property
    def dir(self) -> Path:
        return self.handle.run_dir

    @property
    def store(self) -> StageStore | PlanView:
        return self.handle.store

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """One stage: its MLflow stage run and its entry in ``timings_s``."""
        with self.tracker.stage(name):
            t = time.perf_counter()
            yield
            self.ctx.timings[name] = time.perf_counter() - t


@contextmanager
def open_run(ctx: RunContext, directory: RunDir, truth: GroundTruth) -> Iterator[Run]:
    """A new run directory (or the one resumed), locked and marked running, with its tracker and the plan rank 0 sent
    every process (:func:`share_plan`, which refuses when a process drew other canaries); complete or failed after.

    On a resume, calls an earlier attempt could not log (``tracking_pending.jsonl``) are replayed first; if the
    server is still away they stay there and this attempt adds to them. ``run.json`` records the tracking URI
    and experiment (what ``audit sync`` needs) and, at the end, whether tracking was incomplete.

    On the other processes of ``accelerate launch`` / ``torchrun`` it is a view of rank 0's run: the plan received, a
    store that runs what the plan says (:class:`~audit.core.store.PlanView`), a NullTracker and no printing; it makes,
    locks and writes nothing, so every process runs the same stages (:func:`audit.pipeline.run_origin`).
    """
    from audit.report.tracking import NullTracker, open_tracker

    if not distributed.is_main():
        plan = share_plan(None, truth)  # rank 0 sends it once its run is open, before it scores the base
        yield Run(ctx=dataclasses.replace(ctx, progress=False), handle=RankView(plan.run_dir, directory.resuming,
                                                                                PlanView(plan)),
                  tracker=NullTracker(), plan=plan)  # rank 0 alone prints, writes and logs
        return
    handle = directory.open(ctx.recipe, progress=ctx.progress)
    run_dir = handle.run_dir
    tracker: RunTracker = NullTracker()
    try:
        if ctx.tracking:
            handle.save_status(tracking_uri=ctx.tracking_uri, mlflow_experiment=ctx.recipe.tracking.experiment)
            if handle.resumed and ctx.tracking_down is None:  # a server known to be down would refuse it too
                replay_kept_calls(handle, ctx.tracking_uri, progress=ctx.progress)
        say(ctx.progress and ctx.tracking, f"[audit] MLflow: opening the run in {ctx.tracking_uri}")  # seconds on a cold store
        with open_tracker(ctx.tracking, ctx.tracking_uri, ctx.recipe.tracking.experiment, ctx.recipe.name,
                          run_id=handle.status.get("mlflow_run_id"), pending=run_dir / LAYOUT.pending,
                          progress=ctx.progress) as tracker:
            if tracker.run_id is not None:
                handle.save_status(mlflow_run_id=tracker.run_id)
            # the other processes join the stages the plan names; all refuse here if one drew other canaries than rank 0
            plan = share_plan(lambda: train_plan(ctx, handle, truth), truth)
            yield Run(ctx=ctx, handle=handle, tracker=tracker, plan=plan)
    except BaseException as exc:
        from audit.pipeline.resume import disk_full, failure_status, save_failure
        from audit.train.disk import write_error

        # a full disk is one line, not a traceback, also when torch or safetensors reported it while saving weights
        full = disk_full(write_error(exc, run_dir) or exc, run_dir)
        save_failure(handle, {**failure_status(full or exc), **_tracking_status(tracker)})
        handle.close()
        if full is not None:
            raise full from None
        raise
    handle.save_status(status="complete", finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
                       timings_s={k: round(v, 3) for k, v in ctx.timings.items()}, **_tracking_status(tracker))
    handle.close()


def _tracking_status(tracker: RunTracker) -> dict[str, str]:
    if tracker.run_id is None and not tracker.incomplete:
        return {}
    return {"tracking": "incomplete" if tracker.incomplete else "complete",
            **({"mlflow_run_id": tracker.run_id} if tracker.run_id else {})}


def replay_kept_calls(handle: RunHandle, uri: str, *, progress: bool = True) -> None:
    """Replay ``tracking_pending.jsonl`` into ``uri`` (``audit sync``, and a resume before it reopens the run)."""
    from audit.core.errors import AuditError
    from audit.report.tracking import replay_pending

    if not (handle.run_dir / LAYOUT.pending).is_file():
        return
    try:
        done = replay_pending(handle.run_dir, uri, run_id=handle.status.get("mlflow_run_id"))
    except AuditError as exc:
        say(True, f"[audit] warning: could not replay {LAYOUT.pending} yet ({exc.problem}); it is kept")
        return
    handle.save_status(**({"mlflow_run_id": done.run_id} if done.run_id else {}))
    say(progress, f"[audit] MLflow: replayed {done.calls} calls an earlier attempt could not log")


def record_inputs(run: Run, truth: GroundTruth) -> None:
    """The deterministic stage files (written once; on resume checked byte for byte), progress lines, MLflow params."""
    from audit.core.store import jsonl_text
    from audit.data.ground_truth import ground_truth_files
    from audit.report import git_revision, package_versions
    from audit.report.tracking import flatten

    ctx, recipe, store = run.ctx, run.ctx.recipe, run.store
    if run.handle.resumed and (run.dir / LAYOUT.recipe).is_file():
        # the recipe was read from this file, so it is the same recipe; its text may differ only by keys a newer version
        # added with their defaults (e.g. scoring.precision), and the file keeps what the first attempt wrote
        store.keep(LAYOUT.recipe)
    else:
        store.put(LAYOUT.recipe, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    for name, obj in ground_truth_files(truth).items():
        store.put(name, jsonl_text(obj) if name.endswith(".jsonl") else json_text(obj))
    canaries, injection, preflight = truth.canaries, truth.injection, truth.preflight
    if canaries.key_id:  # the audit key's public id (never the key): a resume or a further tune must use the same key
        run.handle.save_status(key_id=canaries.key_id)
    say(ctx.progress, f"[audit] {'resuming' if run.handle.resumed else 'run directory'} {run.dir}")
    say(ctx.progress, f"[audit] {len(canaries.members())} member canaries "
                      f"in tiers {sorted(set(c.repetitions for c in canaries.members()))}, "
                      f"{len(canaries.references())} references; {len(injection.records)} training records")
    if truth.works is not None:
        roles = [s.role for s in truth.works.subjects]
        say(ctx.progress, f"[audit] whole works: {roles.count('member')} members ({len(injection.manifest.work_placements)} "
                          f"copies planted), {roles.count('held_out')} held out")
    copies = "canary and work copies" if truth.works is not None else "canary copies"
    say(ctx.progress, f"[audit] pre-flight: all {preflight.placements_checked} {copies} reach the loss "
                      f"(canaries up to {preflight.canary_tokens_max} tokens, carriers up to "
                      f"{preflight.record_tokens_max}, max_length {preflight.max_length})")
    tracker = run.tracker
    tracker.log_params(flatten(recipe.model_dump(mode="json")))
    tracker.set_tags({
        "canary_audit.recipe": recipe.name,
        "canary_audit.base_fingerprint": ctx.resolved.provenance.get("weights_fingerprint", ""),
        "canary_audit.manifest_sha256": injection.manifest.sha256(),
        "canary_audit.canary_set_sha256": canaries.sha256(),
        **({"canary_audit.key_id": canaries.key_id} if canaries.key_id else {}),
        "canary_audit.git_revision": git_revision() or "unknown",
        **{f"canary_audit.version.{k}": v for k, v in package_versions().items()},
    })
    with tracker.stage("inject", elapsed_s=ctx.timings["inject"]):  # ran before the run directory existed
        tracker.log_stage_metrics({"members": len(canaries.members()), "references": len(canaries.references()),
                                   "records": len(injection.records), "placements": len(injection.manifest.placements)})
        tracker.log_training_dataset(injection.manifest, [len(x) for x in truth.training_texts],
                                     name=f"{recipe.corpus.source} + {canaries.spec} canaries")


# --------------------------------------------------------------------------------------------------- models


def start_model(ctx: RunContext, origin: Origin, base: PreTrainedModel) -> PreTrainedModel:
    """What training starts from: ``base`` with the origin's saved weights merged in (none for a first tune)."""
    from audit.train.weights import load_tuned

    if not origin.layers:
        return base
    return load_tuned(base, origin.layers, device=ctx.device, trust_remote_code=ctx.recipe.model.trust_remote_code,
                      keep_last_adapter=False)


def seed_torch(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def scoring_backend(ctx: RunContext, model: PreTrainedModel,
                    tokenizer: PreTrainedTokenizerBase) -> AbstractContextManager[ScoringBackend]:
    """``model`` as the recipe scores it: ``scoring.backend`` in ``scoring.precision`` (a context manager yielding a
    :class:`~audit.score.backend.ScoringBackend`)."""
    from audit.score.backend import open_backend

    section = ctx.recipe.scoring
    return open_backend(section.backend, model, tokenizer, precision=section.precision, batch_size=section.batch_size)


def token_view(ctx: RunContext, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
               truth: GroundTruth) -> list[CanaryTokens]:
    """Per-token probabilities of the view's canaries (:mod:`audit.report.render.token_view`), as the recipe scores."""
    from audit.report.render.token_view import canary_token_logprobs, view_candidates

    with scoring_backend(ctx, model, tokenizer) as backend:
        return canary_token_logprobs(backend, tokenizer, view_candidates(truth.canaries))


def write_token_view(run_dir: Path, base_view: list[CanaryTokens], tuned_view: list[CanaryTokens]) -> None:
    from audit.report.render import token_view as views

    views.write_token_view(run_dir, base_view, tuned_view)


def score(ctx: RunContext, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, truth: GroundTruth,
          label: str) -> list[SequenceScore] | None:
    """The canaries' scores under ``model``, computed in ``scoring.precision`` (fp32 by default, whatever training used).

    In a distributed run every process calls it with its own copy of the model and takes a share of the exposure
    work (:func:`audit.score.sharded.score_sharded`); rank 0 gets the scores, the others None. In one process it is
    :func:`audit.score.canaries.score_canaries`.
    """
    from audit.score.sharded import score_sharded

    with scoring_backend(ctx, model, tokenizer) as backend:
        return score_sharded(backend, tokenizer, truth.canaries, truth.reference_secrets, label=label,
                             section=ctx.recipe.scoring, progress=ctx.progress, seed=ctx.recipe.seed)


def scan_works(run: Run, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, truth: GroundTruth, label: str, *,
               origin: Origin | None = None) -> list[WorkWindow]:
    """The whole-work window scan under ``model`` (:mod:`audit.score.works_scan`), in ``scoring.precision``, kept as
    ``works_scan_<label>.jsonl`` (reused on resume); [] when the recipe audits no whole works. With ``origin``, the
    rows that stand before training come from it (a further tune reuses the parent runs' base and tuned scans)."""
    if truth.works is None:
        return []
    from audit.core.store import WorksScanFile

    def scan() -> list[WorkWindow]:
        from audit.score.works_scan import ScanSettings, backend_scorer
        from audit.score.works_scan import scan_works as scan_windows

        section = truth.works.section
        inputs = truth.works.scan_inputs(tokenizer)
        settings = ScanSettings(prefix=section.prefix_tokens, suffix=section.suffix_tokens, stride=section.stride)
        say(run.ctx.progress, f"[audit] works: scanning {len(inputs)} whole works under {label} "
                              f"({settings.prefix} + {settings.suffix}-token windows every {settings.stride})")
        with scoring_backend(run.ctx, model, tokenizer) as backend:
            return scan_windows(inputs, score=backend_scorer(backend), model=label, settings=settings)

    return run.store.get_or_run(WorksScanFile(label), scan if origin is None else lambda: origin.base_works_scan(scan))


def summarize_works(run: Run, truth: GroundTruth, tokenizer: PreTrainedTokenizerBase, rows: list[WorkWindow],
                    training: TrainSummary) -> WholeWorksResult | None:
    """``works_scan.jsonl`` (+ ``.meta.json``) and the report's whole-works section (:mod:`audit.data.works.summary`); None
    without whole works."""
    if truth.works is None:
        return None
    from audit.core.schema import SCHEMA_VERSION
    from audit.core.store import write_json, write_jsonl
    from audit.data.works.summary import summarize_whole_works

    scoring, section = run.ctx.recipe.scoring, truth.works.section
    write_jsonl(run.dir / LAYOUT.works_scan, rows)
    write_json(run.dir / LAYOUT.works_scan_meta, {
        "schema_version": SCHEMA_VERSION, "rows": LAYOUT.works_scan, "prefix_tokens": section.prefix_tokens,
        "suffix_tokens": section.suffix_tokens, "stride": section.stride, "models": sorted({r.model for r in rows}),
        "n_queries": scoring.np_extraction_queries, "p": scoring.np_extraction_probability,
        "tokens": "tokenizer(text, add_special_tokens=False) of each work's audited text (manifest.json work_subjects: "
                  "sha256, n_chars; HMAC-SHA256 under the audit key for synthetic and corpus works); a window is "
                  "tokens[start : start + prefix_tokens + suffix_tokens], scored alone",
        "works": [s.model_dump(mode="json", include={"work_id", "role", "kind", "n_tokens", "sha256"})
                  for s in truth.works.subjects]})
    ids = dict(truth.works.scan_inputs(tokenizer))

    def passage_text(work_id: str, start: int, stop: int) -> str:
        return tokenizer.decode(ids[work_id][start:stop])

    return summarize_whole_works(truth.works, rows, n_queries=scoring.np_extraction_queries,
                                 p=scoring.np_extraction_probability, trainable_params=training.trainable_params,
                                 passage_text=passage_text, seed=run.ctx.recipe.seed)


def calibrate(ctx: RunContext, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, truth: GroundTruth,
              label: str) -> CalibrationSummary | None:
    """``model``'s scores' gap to the HF engine in fp32 on a few canaries (:mod:`audit.score.calibration`), or None
    when the recipe scores with the reference itself (the HF engine in fp32) or turns calibration off
    (``scoring.calibration_canaries``)."""
    from audit.score.calibration import calibrate_scoring

    return calibrate_scoring(model, tokenizer, truth.canaries, truth.reference_secrets, section=ctx.recipe.scoring, label=label)


# --------------------------------------------------------------------------------------------------- train


def train_plan(ctx: RunContext, handle: RunHandle, truth: GroundTruth) -> TrainPlan:
    """Rank 0's plan, made when the run opens: score the base unless ``scores_base.jsonl`` is stored; train unless
    ``train.json`` is, from the newest complete checkpoint if there is one; score the tuned weights unless
    ``scores_tuned.jsonl`` is. The stage store decides the same way on rank 0, from the same files; the other
    processes' store is this plan (:class:`~audit.core.store.PlanView`). The plan names the canaries rank 0 drew (audit
    key id, canary-set hash), which every process checks (:func:`share_plan`)."""
    from audit.core.store import ScoresFile
    from audit.pipeline.resume import last_checkpoint

    store, method = handle.store, ctx.recipe.training.method
    key_id, digest = drawn(truth)
    common = dict(score_base=not store.has(ScoresFile("base")), score_tuned=not store.has(ScoresFile("tuned")),
                  method=method, key_id=key_id, canary_set_sha256=digest)
    if store.has(TrainedWeights(ctx, None)):
        return TrainPlan(run_dir=handle.run_dir, train=False, **common)
    return TrainPlan(run_dir=handle.run_dir, train=True, checkpoint=last_checkpoint(handle), **common)


def drawn(truth: GroundTruth) -> tuple[str | None, str]:
    """What this process drew: the audit key's public id and the canary set's hash."""
    return truth.canaries.key_id, truth.canaries.sha256()


def share_plan(make: Callable[[], TrainPlan] | None, truth: GroundTruth) -> TrainPlan:
    """Rank 0's plan (``make``; None on the other processes) on every process, once every process is known to have drawn
    the same canaries as rank 0: otherwise every process refuses, before anything is trained or scored."""
    plan, every = distributed.share_plan(make, own=drawn(truth))
    plan.check_drawn(every)
    return plan


# --------------------------------------------------------------------------------------------------- outputs, report


def sample_outputs(run: Run, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   truth: GroundTruth) -> OutputsResult | None:
    """What the tuned model writes, scanned for secrets and works (:mod:`audit.score.outputs`); None when off."""
    section = run.ctx.recipe.outputs
    if section.samples <= 0:
        return None
    from audit.score.backend import open_backend
    from audit.score.outputs import outputs_stage

    works = None
    if truth.works is not None:  # the audited whole works, scanned for long near-verbatim blocks
        w = truth.works.section
        roles = {s.work_id: s.role for s in truth.works.subjects}
        works = ([(i, roles[i], ids) for i, ids in truth.works.scan_inputs(tokenizer)], section.ngram, w.nv_max_gap,
                 w.nv_min_block)
    scoring = run.ctx.recipe.scoring  # the recipe's engine, sampling the model in the dtype it was tuned in
    with run.stage("outputs"), open_backend(scoring.backend, model, tokenizer, precision=None,
                                            batch_size=scoring.batch_size) as backend:
        return outputs_stage(run.store, backend, tokenizer, truth.canaries, section, seed=run.ctx.recipe.seed,
                             progress=run.ctx.progress, whole_works=works)


TRACKING_NOTE = "tracking"
"""``report.metric_notes`` key saying that MLflow missed part of this run (and how to replay it)."""


def tracking_note(run_dir: Path) -> str:
    return (f"tracking incomplete: MLflow stopped answering during the run; what it missed is kept in {LAYOUT.pending} "
            f"(replay with `audit sync {run_dir}`)")


def publish(run: Run, origin: Origin, report: AuditReport) -> AuditReport:
    """report.json, report.html/md, every metric and artifact to MLflow, and the origin's record in its parent.

    When tracking is (or becomes) incomplete, the report says so in ``metric_notes["tracking"]``; the report
    returned is the one written."""
    from audit.report import write_report
    from audit.report.render import render_report

    def noted(r: AuditReport) -> AuditReport:
        return r.model_copy(update={"metric_notes": {**r.metric_notes, TRACKING_NOTE: tracking_note(run.dir)}})

    if run.tracker.incomplete:
        report = noted(report)
    write_report(report, run.dir / LAYOUT.report)
    render_report(run.dir, report)  # report.html, report.md, plots/ (audit.report.render)
    # with scoring.every_steps the final audit is each curve's last point: log_report puts it at the last step
    run.tracker.log_report(report, run.dir, log_full_weights=run.ctx.recipe.tracking.log_full_weights)
    run.tracker.set_tags(origin.tags())
    if run.tracker.incomplete and TRACKING_NOTE not in report.metric_notes:  # the server went away during the logging
        report = noted(report)
        write_report(report, run.dir / LAYOUT.report)
    origin.record(report, run.dir)
    return report
