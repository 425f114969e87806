"""The one place that sequences the stages: canaries -> inject -> train -> score -> report.

Everything the user can get wrong (recipe, model, corpus, canary spec, tracking server) is checked *before* the
run directory is created, so a bad input leaves nothing behind. Each stage then writes its file (names and
schema versions: :mod:`audit.core.layout`):

    runs/<name>-<time>-<id>/
      run.json          status (running / failed / complete), timings, error, schema_version
      recipe.yaml       the resolved recipe, overrides applied
      canaries.jsonl    the canaries WITH their secrets: confidential, never logged to MLflow
      canaries.meta.json the rest of the canary set: schema_version, spec, seed, secret space, works (no secrets)
      manifest.json     injection manifest: seed, canary-set hash, dataset fingerprints, placements
      scores_base.jsonl base-model scores (a stage checkpoint: reused by `audit run --resume`)
      trainer/          Trainer checkpoints while training runs (removed once train.json is written)
      adapter/ | model/ the tuned weights (safetensors); train.json records them
      scores_tuned.jsonl tuned-model scores (stage checkpoint)
      calibration_<model>.json with scoring.precision other than fp32: the scores' gap to the HF engine in fp32
      scores.jsonl      one row per canary and model (ids only)
      works_scan.jsonl  with a ``works`` section: one row per whole work, model and window (+ .meta.json; 0600)
      outputs.jsonl     sampled text of the tuned model and its scan (raw text that may hold secrets: run dir only)
      merged/           with training.save_merged: the LoRA adapter folded into the base, as safetensors
      releases/         with a release section: merged/ and model.<type>.gguf, each scored (release_<type>.json)
      children.jsonl    one line per further tune of this run (`audit run RECIPE parent=RUN_DIR`, audit.pipeline.chain)
      token_view.json   per-token probabilities of the most-learned top-tier canary (secret tokens masked)
      report.json       the audit report
      report.html       the human report, self-contained (plots embedded); report.md + plots/ the same in Markdown

How: the stages (:mod:`audit.pipeline.stages`) run over a :class:`~audit.core.store.StageStore`, the only resume logic (a stage
whose file exists is reused, else it runs and its file is written once); an :class:`~audit.pipeline.origin.Origin` carries
everything a further tune (:mod:`audit.pipeline.chain`) or a model trained elsewhere (:mod:`audit.pipeline.measure`) does
differently, the train stage included (``origin.tuned_model``: trains, or loads what someone else trained); tracking off is a
:class:`~audit.report.tracking.NullTracker`. Every process of ``accelerate launch`` / ``torchrun`` runs this one sequence: rank 0
sends the others one :class:`~audit.train.types.TrainPlan` when its run opens, and their stage store is a view of it
(:class:`~audit.core.store.PlanView`: it runs base scoring, training and tuned scoring when rank 0 does, so every process
scores a share of the canaries, :mod:`audit.score.sharded`, and writes nothing), with a NullTracker and no printing;
after tuned scoring one guard ends them, as lm-evaluation-harness guards its post-processing by rank. The base is
scored before the start model is built, since a further tune merges its parent's weights into those very layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from audit.core.layout import LAYOUT
from audit.core.schema import AuditReport, Recipe
from audit.pipeline.resume import NEW_RUN, RunDir

if TYPE_CHECKING:
    from audit.pipeline.origin import Origin


@dataclass(frozen=True)
class AuditResult:
    run_dir: Path
    report: AuditReport


def run_audit(
    recipe: Recipe,
    *,
    tracking_uri: str | None = None,
    tracking: bool | None = None,
    progress: bool = True,
    resume_dir: Path | None = None,
) -> AuditResult | None:
    """Run a whole audit and return its run directory and report (None on the non-main processes of a distributed run).

    ``resume_dir``: continue that interrupted run (its stored recipe is ``recipe``) instead of starting a new one;
    stages whose files exist are reused, training continues from its last checkpoint (:class:`audit.core.store.StageStore`).
    """
    from audit.pipeline.origin import origin_for
    from audit.pipeline.resume import RunDir

    directory = RunDir(None if resume_dir is None else Path(resume_dir))  # the one place a run learns it resumes
    # a first tune, a further tune of recipe.parent, or (resumed) a model measured by `audit measure`: the one difference
    origin = origin_for(recipe, directory=directory)
    return run_origin(origin, tracking_uri=tracking_uri, tracking=tracking, progress=progress, directory=directory)


def run_origin(
    origin: Origin,
    *,
    tracking_uri: str | None = None,
    tracking: bool | None = None,
    progress: bool = True,
    directory: RunDir = NEW_RUN,
) -> AuditResult | None:
    """The stages for ``origin`` (:mod:`audit.pipeline.origin`): :func:`run_audit` for a recipe, ``audit measure`` for a model
    trained elsewhere (:class:`~audit.pipeline.origin.ExternalModel`, whose train stage loads the weights it was given).
    ``directory``: a new run directory, or the run resumed (:class:`~audit.pipeline.resume.RunDir`, asked once, when it opens)."""
    from audit.train import distributed

    try:
        return _run_stages(origin, tracking_uri=tracking_uri, tracking=tracking, progress=progress, directory=directory)
    finally:
        distributed.finish()  # every process, rank 0 after its report: a live gloo group aborts the exit


def _run_stages(origin: Origin, *, tracking_uri: str | None, tracking: bool | None, progress: bool,
                directory: RunDir) -> AuditResult | None:
    from audit.core.store import CalibrationFile, InMemory, ScoresFile, write_jsonl
    from audit.pipeline import stages
    from audit.report import build_report
    from audit.train import distributed

    ctx = stages.RunContext.prepare(origin, tracking_uri=tracking_uri, tracking=tracking, progress=progress,
                                    directory=directory)
    truth = ctx.ground_truth(origin)  # canaries + inject + pre-flight, before anything is written
    # lock, run.json, tracker; failed or complete at the end. Rank 0's plan goes to the other processes of a distributed
    # run, for which this is a view of rank 0's run: its store runs what the plan says, writes, logs and prints nothing
    with stages.open_run(ctx, directory, truth) as run:
        ctx = run.ctx  # progress off on the other processes
        stages.record_inputs(run, truth)  # writes, logs and prints nothing on the other processes

        # ---- base model, scored before training on the same inputs the tuned model will see
        with run.stage("score_base"):
            base, tokenizer = stages.load_base(ctx)
            view_base = run.store.get_or_run(InMemory("token view of the base"),  # per-token probabilities, untuned
                                             lambda: stages.token_view(ctx, base, tokenizer, truth))
            stages.seed_torch(ctx.recipe.seed)
            base_scores = run.store.get_or_run(ScoresFile("base"), lambda: origin.base_scores(
                lambda: stages.score(ctx, base, tokenizer, truth, "base")))
            works_base = stages.scan_works(run, base, tokenizer, truth, "base", origin=origin)  # [] without works
            calibration = [run.store.get_or_run(CalibrationFile("base"),  # scoring.precision's error bar
                                                lambda: stages.calibrate(ctx, base, tokenizer, truth, "base"))]
            start = stages.start_model(ctx, origin, base)  # a further tune starts from its parent's weights

        # ---- train (every process, as the plan says)
        with run.stage("train"):
            tuned = run.store.get_or_run(origin.train_artifact(ctx, start), lambda: origin.tuned_model(
                ctx, start, tokenizer, truth, run.plan, tracker=run.tracker, progress=ctx.progress))  # trains, or loads

        # ---- tuned model
        with run.stage("score_tuned"):
            tuned_scores = run.store.get_or_run(ScoresFile("tuned"),
                                                lambda: stages.score(ctx, tuned.model, tokenizer, truth, "tuned"))
            if not distributed.is_main():  # the other processes' part ends with tuned scoring: the rest is rank 0's
                return None
            works_tuned = stages.scan_works(run, tuned.model, tokenizer, truth, "tuned")
            calibration.append(run.store.get_or_run(CalibrationFile("tuned"),
                                                     lambda: stages.calibrate(ctx, tuned.model, tokenizer, truth, "tuned")))
        releases = []  # ---- releases (the recipe's release section): made from the tuned weights, read back, scored alike
        if ctx.recipe.release is not None and ctx.recipe.release.labels:
            from audit.pipeline.release.stage import make_releases

            with run.stage("release"):
                releases = make_releases(run, tuned, tokenizer, truth)
        scores = base_scores + tuned_scores
        write_jsonl(run.dir / LAYOUT.scores, scores)
        stages.write_token_view(run.dir, view_base, stages.token_view(ctx, tuned.model, tokenizer, truth))
        outputs = stages.sample_outputs(run, tuned.model, tokenizer, truth)  # None unless outputs.samples > 0
        works = stages.summarize_works(run, truth, tokenizer, works_base + works_tuned, tuned.summary)  # works_scan.jsonl

        # ---- report
        with run.stage("report"):
            report = build_report(run=run, origin=origin, truth=truth, scores=scores, training=tuned.summary, outputs=outputs,
                                  works=works, calibration=[c for c in calibration if c is not None], releases=releases)
            report = stages.publish(run, origin, report)  # report.json/html/md, MLflow, the parent's children.jsonl
    return AuditResult(run_dir=run.dir, report=report)
