"""The one place that sequences the stages: canaries -> inject -> train -> score -> report.

Everything the user can get wrong (recipe, model, corpus, canary spec, tracking server) is checked *before* the
run directory is created, so a bad input leaves nothing behind. Each stage then writes its file:

    runs/<name>-<time>-<id>/
      run.json          status (running / failed / complete), timings, error
      recipe.yaml       the resolved recipe, overrides applied
      canaries.jsonl    the canaries WITH their secrets: confidential, never logged to MLflow
      manifest.json     injection manifest: seed, canary-set hash, dataset fingerprints, placements
      scores_base.jsonl base-model scores (a stage checkpoint: reused by `audit run --resume`)
      trainer/          Trainer checkpoints while training runs (removed once train.json is written)
      adapter/ | model/ the tuned weights (safetensors); train.json records them
      scores_tuned.jsonl tuned-model scores (stage checkpoint)
      scores.jsonl      one row per canary and model (ids only)
      outputs.jsonl     sampled text of the tuned model and its scan (raw text that may hold secrets: run dir only)
      merged/           with training.save_merged: the LoRA adapter folded into the base, as safetensors
      children.jsonl    one line per further tune of this run (`audit run RECIPE parent=RUN_DIR`, audit.chain)
      token_view.json   per-token probabilities of the most-learned top-tier canary (secret tokens masked)
      report.json       the audit report
      report.html       the human report, self-contained (plots embedded); report.md + plots/ the same in Markdown
"""

from __future__ import annotations

import math
import platform
import secrets as _secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from importlib import metadata
from pathlib import Path

import yaml

from audit import distributed, lineage, resume
from audit.canaries import load_spec
from audit.gates import evaluate_gates, report_metrics
from audit.ground_truth import ground_truth_files, ground_truth_for_model
from audit.models import ResolvedModel, resolve_model
from audit.render import render_report
from audit.render.token_view import canary_token_logprobs, view_candidates, write_token_view
from audit.report import summarize_tiers, write_report
from audit.schema import AuditReport, ModelInfo, Recipe, TrackingInfo
from audit.store import write_jsonl
from audit.tracking import check_tracking_reachable, flatten, resolve_tracking_uri, stage_of, tracked_run, ui_command
from audit.works.information import works_information

TRACKED_PACKAGES = ("canary-audit", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "mlflow")


@dataclass(frozen=True)
class AuditResult:
    run_dir: Path
    report: AuditReport


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def new_run_dir(recipe: Recipe) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    root = Path(recipe.output.root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{recipe.name.replace('/', '-')}-{stamp}-{_secrets.token_hex(3)}"
    path.mkdir()
    return path


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
    stages whose files exist are reused, training continues from its last checkpoint (see :mod:`audit.resume`).
    """
    import torch

    from audit.metrics.suite import summarize_scores
    from audit.models import load_model_and_tokenizer
    from audit.score.canaries import score_canaries, space_bits
    from audit.train.sft import choose_device, train_sft

    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    # ---- validate everything the user controls, before anything is written
    parent = None
    if recipe.parent:  # a further tune of an earlier run's weights: its model, canaries and scoring (audit.chain)
        from audit import chain

        parent = chain.load_parent(recipe.parent)
        recipe = chain.inherit(recipe, parent)
    load_spec(recipe.canaries.spec, recipe.canaries.params)  # a bad spec name fails before any model work
    device = choose_device(recipe.training)
    if parent is not None:
        chain.check_same_device(parent, device=device.device, precision=device.precision)
    use_tracking = recipe.tracking.enabled if tracking is None else tracking
    uri = resolve_tracking_uri(tracking_uri or recipe.tracking.uri)
    if use_tracking:
        check_tracking_reachable(uri)
    resolved: ResolvedModel = resolve_model(recipe.model.source, revision=recipe.model.revision, progress=progress,
                                            allow_pickle=recipe.model.allow_pickle,
                                            trust_remote_code=recipe.model.trust_remote_code)
    timings["resolve"] = time.perf_counter() - t0

    # ---- stage: canaries + inject + pre-flight (audit.ground_truth), still before anything is written
    t = time.perf_counter()
    truth_for = ground_truth_for_model if parent is None else partial(chain.ground_truth, parent=parent)
    truth = truth_for(recipe, model_path=resolved.path, fingerprint=resolved.provenance.get("weights_fingerprint", ""),
                      device=device.device, dtype=device.torch_dtype, progress=progress)
    canary_set, injection, reference_secrets = truth.canaries, truth.injection, truth.reference_secrets
    timings["inject"] = time.perf_counter() - t

    run_dir = distributed.from_main(lambda: new_run_dir(recipe)) if resume_dir is None else Path(resume_dir)
    if not distributed.is_main():  # another process of `accelerate launch`: it only trains (audit.distributed)
        distributed.worker_train(run_dir=run_dir, model_path=resolved.path, texts=truth.training_texts, section=recipe.training,
                                 seed=recipe.seed, device=device, parent=parent, trust_remote_code=recipe.model.trust_remote_code)
        return None
    run = resume.open_run(run_dir, resumed=resume_dir is not None, progress=progress)
    status = run.status
    try:
        resume.write_stage(run, "recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
        for name, obj in ground_truth_files(truth).items():  # canaries.jsonl, manifest.json, preflight.json, works.json
            (resume.write_stage_jsonl if name.endswith(".jsonl") else resume.write_stage_json)(run, name, obj)
        _say(progress, f"[audit] {'resuming' if run.resumed else 'run directory'} {run_dir}")
        _say(progress, f"[audit] {len(canary_set.members())} member canaries in tiers {sorted(set(c.repetitions for c in canary_set.members()))}, "
                       f"{len(canary_set.references())} references; {len(injection.records)} training records")
        _say(progress, f"[audit] pre-flight: all {truth.preflight.placements_checked} canary copies reach the loss "
                       f"(canaries up to {truth.preflight.canary_tokens_max} tokens, carriers up to "
                       f"{truth.preflight.record_tokens_max}, max_length {truth.preflight.max_length})")

        _say(progress and use_tracking, f"[audit] MLflow: opening the run in {uri}")
        with _maybe_tracked(use_tracking, uri, recipe, run_id=status.get("mlflow_run_id")) as tracker:
            if tracker is not None:
                run.save_status(mlflow_run_id=tracker.run_id)
                tracker.log_params(flatten(recipe.model_dump(mode="json")))
                tracker.set_tags({
                    "canary_audit.recipe": recipe.name,
                    "canary_audit.base_fingerprint": resolved.provenance.get("weights_fingerprint", ""),
                    "canary_audit.manifest_sha256": injection.manifest.sha256(),
                    "canary_audit.canary_set_sha256": canary_set.sha256(),
                    "canary_audit.git_revision": git_revision() or "unknown",
                    **{f"canary_audit.version.{k}": v for k, v in package_versions().items()},
                })
                tracker.begin_stage("inject", elapsed_s=timings["inject"])  # nested stage runs (audit.tracking)
                tracker.log_stage_metrics({"members": len(canary_set.members()), "references": len(canary_set.references()),
                                           "records": len(injection.records), "placements": len(injection.manifest.placements)})
                tracker.log_training_dataset(injection.manifest, [len(x) for x in truth.training_texts],
                                             name=f"{recipe.corpus.source} + {canary_set.spec} canaries")

            # ---- base model, scored before training on the same inputs the tuned model will see
            stage_of(tracker, "score_base")
            t = time.perf_counter()
            _say(progress, f"[audit] score base: loading {recipe.model.source} and its per-token view")
            model, tokenizer = load_model_and_tokenizer(resolved.path, dtype=device.torch_dtype, device=device.device,
                                                        trust_remote_code=recipe.model.trust_remote_code)
            base_fp = resolved.provenance.get("weights_fingerprint")
            if base_fp is None:
                from audit.models import fingerprint_safetensors_dir

                base_fp = fingerprint_safetensors_dir(resolved.path)
            view_base = canary_token_logprobs(model, tokenizer, view_candidates(canary_set))  # per-token view, untuned
            torch.manual_seed(recipe.seed)
            base_scores = resume.load_scores(run, "base")
            if base_scores is None and parent is not None:  # base and parent weights as the parent runs measured them
                base_scores = chain.inherited_scores(parent)
                resume.save_scores(run, "base", base_scores)
            if parent is not None:  # train from the parent's tuned weights
                model = chain.start_model(parent, model, device=device, trust_remote_code=recipe.model.trust_remote_code)
            if base_scores is None:
                base_scores = score_canaries(model, tokenizer, canary_set, reference_secrets, label="base",
                                             section=recipe.scoring, progress=progress, seed=recipe.seed)
                resume.save_scores(run, "base", base_scores)
            timings["score_base"] = time.perf_counter() - t

            # ---- train
            stage_of(tracker, "train")
            t = time.perf_counter()
            weights_dir = run_dir / ("adapter" if recipe.training.method == "lora" else "model")
            on_loss = (lambda step, loss: tracker.log_metrics({"train.loss": loss}, step=step)) if tracker else None
            trained = resume.finished_training(run, model, weights_dir, device=device)
            plan = distributed.from_main(lambda: {"train": trained is None,  # the other processes train alongside
                                                  "checkpoint": None if trained is not None else resume.last_checkpoint(run)})
            if trained is None:
                trained = train_sft(model, tokenizer, truth.training_texts,
                                    section=recipe.training, seed=recipe.seed, work_dir=run_dir / resume.TRAINER_DIR,
                                    weights_dir=weights_dir, device=device, on_loss=on_loss, progress=progress,
                                    resume_from_checkpoint=plan["checkpoint"],
                                    report_to="mlflow" if tracker is not None else "none")
                resume.save_training(run, trained.summary)
                trained = distributed.reload_trained(trained, model_path=resolved.path, weights_dir=weights_dir, device=device,
                                                     parent=parent, trust_remote_code=recipe.model.trust_remote_code)
            timings["train"] = time.perf_counter() - t

            # ---- tuned model
            stage_of(tracker, "score_tuned")
            t = time.perf_counter()
            tuned_scores = resume.load_scores(run, "tuned")
            if tuned_scores is None:
                tuned_scores = score_canaries(trained.model, tokenizer, canary_set, reference_secrets, label="tuned",
                                              section=recipe.scoring, progress=progress, seed=recipe.seed)
                resume.save_scores(run, "tuned", tuned_scores)
            timings["score_tuned"] = time.perf_counter() - t
            scores = base_scores + tuned_scores
            write_jsonl(run_dir / "scores.jsonl", scores)
            write_token_view(run_dir, view_base, canary_token_logprobs(trained.model, tokenizer, view_candidates(canary_set)))

            # ---- outputs: what the tuned model writes, scanned for secrets and works (audit.outputs)
            outputs = None
            if recipe.outputs.samples > 0:
                from audit.outputs import outputs_stage

                stage_of(tracker, "outputs")
                t = time.perf_counter()
                outputs = outputs_stage(run_dir, trained.model, tokenizer, canary_set, recipe.outputs, seed=recipe.seed,
                                        progress=progress)
                timings["outputs"] = time.perf_counter() - t

            # ---- report
            stage_of(tracker, "report")
            base_node = lineage.node("base_weights", resolved.provenance.get("name", recipe.model.source), base_fp,
                                     source=recipe.model.source)
            data_node = lineage.data_node(recipe.corpus.source, canary_set.spec, injection.manifest.sha256(),
                                          n_records=len(injection.records), planted=recipe.canaries.inject)
            tuned_node = lineage.node("tuned_weights", lineage.tune_label(recipe.training.method, further=parent is not None),
                                      trained.summary.weights_fingerprint,
                                      [base_node if parent is None else parent.tuned_node(), data_node], path=weights_dir.name)
            nodes = [base_node, data_node, tuned_node] if parent is None else chain.chain_lineage(parent, data_node, tuned_node)
            nodes += lineage.derived_nodes(
                tuned_node, merged_fingerprint=trained.summary.merged_fingerprint, merged_path="merged",
                outputs_fingerprint=outputs.fingerprint if outputs else None,
                outputs_details={"file": "outputs.jsonl", "samples": outputs.summary["protocol"]["samples"],
                                 "samples_with_member_secret": outputs.summary["samples_with_member_secret"]} if outputs else None)
            tiers = summarize_tiers(scores)
            suite = summarize_scores(scores, recipe.scoring)  # every metric under its stable key (audit.metrics.suite)
            extra_metrics = dict(outputs.metrics) if outputs else {}
            persistence = None
            if parent is not None:  # how much of the parent's canaries survived this tune (audit.chain)
                after = suite.metrics.get("mia.auc/loss_diff")
                persistence, kept = chain.persistence_summary(scores, parent, mia_after=after.value if after else None,
                                                              inject=recipe.canaries.inject)
                extra_metrics.update(kept)
            timings["total"] = time.perf_counter() - t0
            tracking_info = None
            if tracker is not None:
                tracking_info = TrackingInfo(uri=uri, experiment_id=tracker.experiment_id, run_id=tracker.run_id,
                                             ui_command=ui_command(uri))
            report = AuditReport(
                run_id=run_dir.name,
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                recipe=recipe.model_dump(mode="json"),
                recipe_fingerprint=recipe.fingerprint(),
                seed=recipe.seed,
                model=ModelInfo(source=recipe.model.source, kind=resolved.kind, path=str(resolved.path),  # type: ignore[arg-type]
                                fingerprint=base_fp, provenance=resolved.provenance),
                canaries={**truth.summary(), "works_information": works_information(canary_set, scores)},
                works=canary_set.works,
                manifest_sha256=injection.manifest.sha256(),
                training=trained.summary,
                space_bits=round(space_bits(canary_set), 6),
                exposure_max=round(math.log2(len(reference_secrets) + 1), 6),
                tiers=tiers,
                lineage=nodes,
                timings_s={k: round(v, 3) for k, v in timings.items()},
                versions=package_versions(),
                git_revision=git_revision(),
                tracking=tracking_info,
                metrics={**suite.metrics, **extra_metrics},
                metric_notes=suite.notes,
                outputs=outputs.summary if outputs else None,
                parent_run=str(parent.run_dir) if parent else None,
                persistence=persistence,
            )
            report = report.model_copy(update={"gates": evaluate_gates(recipe.gates, report_metrics(report))})
            write_report(report, run_dir / "report.json")
            render_report(run_dir, report)  # report.html, report.md, plots/ (audit.render)
            if tracker is not None:  # every report metric, tags, artifacts (audit.tracking.Tracker.log_report)
                tracker.log_report(report, run_dir, log_full_weights=recipe.tracking.log_full_weights)
                if parent is not None and parent.report.tracking is not None:
                    tracker.set_tags({"canary_audit.parent_mlflow_run": parent.report.tracking.run_id})
            if parent is not None:
                chain.record_child(parent, run_dir=run_dir, tuned_node=tuned_node, metrics=extra_metrics)
    except BaseException as exc:
        run.save_status(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        run.close()
        raise
    run.save_status(status="complete", finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
                    timings_s=report.timings_s)
    run.close()
    return AuditResult(run_dir=run_dir, report=report)


class _NoTracking:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _maybe_tracked(enabled: bool, uri: str, recipe: Recipe, *, run_id: str | None = None):
    if not enabled:
        return _NoTracking()
    return tracked_run(uri, recipe.tracking.experiment, recipe.name, run_id=run_id)

