"""``CanaryAuditCallback``: audit your own ``transformers.Trainer`` / TRL ``SFTTrainer`` run with two lines.

    from audit import CanaryAuditCallback
    trainer = SFTTrainer(..., train_dataset=train, callbacks=[CanaryAuditCallback(ground_truth="gt", every_steps=50)])

``gt`` is what :func:`audit.inject_canaries` (or ``audit inject --out gt``) wrote; ``train`` is the dataset it returned.
The callback does, in the Trainer's own loop:

on_train_begin  the pre-flight against the trainer's REAL dataset and collator (:func:`trainer_preflight`): every
                planted copy of every member canary must reach the loss (labels not -100) after the trainer's
                tokenization, truncation, packing and loss masking. A copy that does not would be a silent false
                negative ("nothing memorized"), so it is an :class:`~audit.core.errors.AuditError` that stops training.
                Then the base scores for the curve: for a PEFT model under ``model.disable_adapter()`` (no second
                copy in memory), for a full fine-tune the weights as training starts (step 0).
each point      (``every_steps=N``, ``on_evaluate=True``, ``on_epoch_end=True``) the canaries scored on the live model
                (eval mode, no grad, RNG state restored, train mode back), summarized by the report's suite and
                logged as MLflow step metrics (``step=state.global_step``) under the report's keys.
on_train_end    the weights saved beside the Trainer's output (``<output_dir>/canary-audit/adapter`` or ``model``),
                then the final audit, the training as one more origin (:class:`audit.pipeline.origin.LiveTraining`) that
                :func:`audit.pipeline.run_origin` runs: the run directory, report.json/html and gates as
                ``audit measure gt --adapter ...`` writes them, with the trainer's steps and final loss, the curve
                (``report.curves``, a plot in the report) and the callback's ``gates`` (which may read the curve:
                ``of: max | first_step_above``) in the one report built. ``callback.result`` is the
                :class:`audit.pipeline.AuditResult`.

MLflow: the callback's run is nested under the run your own ``MLflowCallback`` (``report_to="mlflow"``) opened when
one is active, in the same store; with none, it is a run of the project's default tracking (``$MLFLOW_TRACKING_URI``,
else ``./mlflow.db``), as ``audit run`` makes. Never a second top-level run beside yours. ``tracking=False``: none.

Distributed: every process runs the pre-flight on its own dataloader; only rank 0 scores and writes. Under DDP the
parameters are whole on every rank, so rank 0 measures at each point while the others wait at the next collective.
Under FSDP or DeepSpeed ZeRO-3 they are sharded and a forward pass on rank 0 alone would hang or fail, so the live
points are skipped with one warning, and at the end the callback prints the ``audit measure`` command to run on the
saved weights instead of measuring in the job.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from audit.core.errors import AuditError
from audit.core.layout import LAYOUT
from audit.core.schema import CanarySet, GateSpec
from audit.train.curve_points import (  # noqa: F401  (re-exported: the callback's measuring part)
    CurveCallback,
    CurveRecorder,
    MeasurePoints,
    last_step,
    measuring,
    point_metrics,
    sharded_parameters,
    top_exposure,
)

if TYPE_CHECKING:
    from audit.pipeline.external import GroundTruthDir

OUTPUT_SUBDIR = "canary-audit"


# --------------------------------------------------------------------------------------------------- pre-flight


def trainer_preflight(dataset: Any, collate: Callable[[list[Any]], dict[str, Any]], tokenizer: Any, canaries: CanarySet,
                      *, batch_size: int = 64) -> dict[str, int]:
    """Count, per member canary, the copies whose secret reaches the loss in what the trainer really trains on.

    ``dataset`` is the trainer's processed train dataset (after its tokenization, truncation and packing) and
    ``collate`` its data collator (which builds the labels and their -100 mask). Each batch is collated; the tokens
    that carry loss (label != -100, not a sequence's first token, which nothing predicts) are decoded span by span,
    and a copy counts when a span holds the canary's secret with the end of its prefix (so a secret cut by
    truncation, packing or masking does not). Raises :class:`AuditError` when any member has fewer copies than it
    was planted with; returns ``canary id -> copies found``.
    """
    import torch

    members = canaries.members()
    needles = {c.id: (c.prefix[-8:] + c.secret).lstrip() for c in members}
    found = dict.fromkeys(needles, 0)
    n = len(dataset)
    for start in range(0, n, batch_size):
        batch = collate([dataset[i] for i in range(start, min(n, start + batch_size))])
        ids = batch["input_ids"]
        labels = batch.get("labels")
        if labels is None:
            mask = batch.get("attention_mask")
            labels = ids.masked_fill(mask == 0, -100) if mask is not None else ids
        ids, labels = torch.as_tensor(ids), torch.as_tensor(labels)
        for row_ids, row_labels in zip(ids.tolist(), labels.tolist(), strict=True):
            for span in _loss_spans(row_ids, row_labels):
                text = tokenizer.decode(span)
                for cid, needle in needles.items():
                    found[cid] += text.count(needle)
    short = [(c, found[c.id]) for c in members if found[c.id] < c.repetitions]
    if short:
        missing = sum(c.repetitions - k for c, k in short)
        planted = sum(c.repetitions for c in members)
        first, got = short[0]
        raise AuditError(
            f"pre-flight (trainer): {missing} of {planted} planted canary copies never reach the loss in the trainer's "
            f"dataset and collator (e.g. canary {first.id}: {got} of {first.repetitions} copies); they are cut by "
            "truncation or packing, masked (labels -100), or not in train_dataset",
            fix="train on the dataset inject_canaries returned, with max_length that holds every record, and without "
                "masking the records that carry canaries (assistant_only_loss / completion_only_loss)")
    return found


def _loss_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for i, (token, label) in enumerate(zip(ids, labels, strict=True)):
        if i > 0 and label != -100:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


# --------------------------------------------------------------------------------------------------- the callback


class CanaryAuditCallback(TrainerCallback):
    """Audit the training run this callback is added to (see the module docstring).

    ``ground_truth``: the ground-truth directory. ``every_steps`` / ``on_evaluate`` / ``on_epoch_end``: the curve's
    measurement points (none: only the final audit). ``gates``: extra release gates (a YAML path or a list of
    mappings / :class:`GateSpec`) beside the recipe's. ``tracking``: False for no MLflow; ``tracking_uri`` a store.
    ``out_root``: where the run directory goes (default ``runs/``). ``preflight=False`` skips the train-begin check
    (never needed for the dataset ``inject_canaries`` returned).
    """

    def __init__(self, ground_truth: str | Path, *, every_steps: int = 0, on_evaluate: bool = False,
                 on_epoch_end: bool = False, gates: str | Path | Sequence[Any] | None = None,
                 tracking: bool | None = None, tracking_uri: str | None = None, out_root: str | Path | None = None,
                 progress: bool = True, preflight: bool = True) -> None:
        if not isinstance(ground_truth, str | os.PathLike) or not str(ground_truth):
            raise AuditError(f"CanaryAuditCallback(ground_truth=) must be the ground-truth directory, got {ground_truth!r}",
                             fix="pass ground_truth= the folder inject_canaries(out=...) or `audit inject --out` wrote")
        self.ground_truth = Path(ground_truth)
        self.points = MeasurePoints(every_steps, on_evaluate, on_epoch_end)
        self.extra_gates = _gate_specs(gates)
        self.tracking, self.tracking_uri, self.out_root = tracking, tracking_uri, out_root
        self.progress, self.check_preflight = progress, preflight
        self.recorder: CurveRecorder | None = None
        self.truth: GroundTruthDir | None = None
        self.result: Any = None
        self.preflight_copies: dict[str, int] = {}
        self._tracker: Any = None
        self._stack = ExitStack()
        self._live = False

    # ---- train begin

    def on_train_begin(self, args, state, control, model=None, processing_class=None, train_dataloader=None, **kwargs):
        tokenizer = processing_class
        if tokenizer is None or not hasattr(tokenizer, "decode"):
            raise AuditError("CanaryAuditCallback needs the trainer's tokenizer",
                             fix="pass processing_class=tokenizer to the Trainer")
        from audit.pipeline.external import exposure_references, read_ground_truth_dir
        from audit.pipeline.origin import ground_truth_key

        truth = self.truth = read_ground_truth_dir(self.ground_truth)  # the one reader, as `audit measure` reads it
        assert truth.canaries is not None, "read without chain_run: canaries.meta.json is there"
        key = ground_truth_key(truth)
        if self.check_preflight:
            self.preflight_copies = _preflight_on(train_dataloader, tokenizer, truth.canaries)
        if not state.is_world_process_zero:
            return
        self._say(f"[audit] pre-flight (trainer): every planted copy of {len(truth.canaries.members())} member canaries "
                  "reaches the loss" if self.check_preflight else "[audit] pre-flight (trainer) skipped")
        self._open_tracking(truth)
        self._live = self.points.every_steps > 0 or self.points.at_evaluate or self.points.at_epoch_end
        if self._live and sharded_parameters(args):
            self._live = False
            self._say("[audit] warning: parameters are sharded (FSDP / ZeRO-3): no live curve points; the final audit "
                      "runs after training with `audit measure` (command printed at the end)")
        if self._live:
            self.recorder = CurveRecorder(canaries=truth.canaries,
                                          reference_secrets=exposure_references(truth, tokenizer=tokenizer, key=key),
                                          section=truth.recipe.scoring, seed=truth.recipe.seed, tokenizer=tokenizer,
                                          on_point=self._log_point, progress=self.progress)
            self.recorder.score_base(model)

    # ---- measurement points

    def _measure(self, state, model) -> None:
        if self.recorder is None or not state.is_world_process_zero or last_step(state):
            return
        metrics = self.recorder.measure(model, state.global_step)
        top = top_exposure(metrics)
        self._say(f"[audit] curve point at step {state.global_step}" + (f": {top} {metrics[top]:.2f} bits" if top else ""))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.points.every_steps and state.global_step % self.points.every_steps == 0:
            self._measure(state, model)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if self.points.at_evaluate:
            self._measure(state, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.points.at_epoch_end:
            self._measure(state, model)

    # ---- train end

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero:
            return
        try:
            weights = _save_weights(model, processing_class, Path(args.output_dir) / OUTPUT_SUBDIR)
            if sharded_parameters(args):
                self._say(f"[audit] measure the saved weights with: {_measure_command(self.ground_truth, weights)}")
            else:
                self.result = self._final_audit(weights, state)
        except BaseException as exc:  # the MLflow run ends FAILED (KILLED on Ctrl-C), and the error goes on up
            with suppress(BaseException):
                self._stack.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._stack.close()

    def _final_audit(self, weights: dict[str, Path], state: Any) -> Any:
        """The saved weights measured as ``audit measure`` measures them, with what the trainer knows: one run of the
        pipeline (:class:`audit.pipeline.origin.LiveTraining`), one report built, gated, written and rendered."""
        from audit.pipeline import run_origin
        from audit.pipeline.measure import measured_model
        from audit.pipeline.origin import LiveTraining
        from audit.train import distributed

        assert self.truth is not None, "on_train_begin read the ground truth"
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        origin = LiveTraining(measured=measured_model(self.truth, out_root=self.out_root, progress=self.progress, **weights),
                              steps=int(state.global_step), final_loss=float(losses[-1]) if losses else None,
                              curves=self.recorder.curves if self.recorder is not None else {},
                              gates=tuple(self.extra_gates), tracker=self._tracker)
        with distributed.alone():  # rank 0 by itself after a DDP training: the other ranks are not in this pipeline
            result = run_origin(origin, tracking=False, progress=self.progress)  # the callback's MLflow run: origin.tracker
        if self.recorder is not None:
            self._say(f"[audit] curve: {self.recorder.points} points, {self.recorder.seconds:.1f} s of scoring during training")
        self._say(f"[audit] report: {result.run_dir / LAYOUT.html}; gates: "
                  f"{sum(not g.passed for g in result.report.gates)} failed of {len(result.report.gates)}")
        return result

    # ---- tracking

    def _open_tracking(self, truth: GroundTruthDir) -> None:
        from audit.report.tracking import check_tracking_reachable, open_tracker, resolve_tracking_uri

        enabled = truth.recipe.tracking.enabled if self.tracking is None else self.tracking
        if not enabled:
            return
        uri = resolve_tracking_uri(self.tracking_uri or truth.recipe.tracking.uri)
        check_tracking_reachable(uri)
        self._tracker = self._stack.enter_context(open_tracker(True, uri, truth.recipe.tracking.experiment,
                                                               f"{truth.recipe.name}-callback", progress=self.progress))
        self._tracker.set_tags({"canary_audit.origin": "trainer_callback", "canary_audit.ground_truth": str(self.ground_truth),
                                "canary_audit.canary_set_sha256": truth.canaries.sha256()})

    def _log_point(self, step: int, metrics: dict[str, float]) -> None:
        if self._tracker is not None:
            self._tracker.log_metrics(metrics, step=step)

    def _say(self, line: str) -> None:
        if self.progress:
            print(line, file=sys.stderr, flush=True)


def _gate_specs(gates: str | Path | Sequence[Any] | None) -> list[GateSpec]:
    from audit.core.gates import load_gate_specs, parse_gate_specs

    if gates is None:
        return []
    if isinstance(gates, str | Path):
        return load_gate_specs(gates)
    return parse_gate_specs([g.model_dump() if isinstance(g, GateSpec) else g for g in gates],
                            source="CanaryAuditCallback(gates=)")


def _preflight_on(loader: Any, tokenizer: Any, canaries: CanarySet) -> dict[str, int]:
    if loader is None:
        raise AuditError("CanaryAuditCallback found no train dataloader at train begin", fix="give the Trainer a train_dataset")
    dataset, collate = getattr(loader, "dataset", None), getattr(loader, "collate_fn", None)
    if dataset is None or collate is None or not hasattr(dataset, "__len__"):
        raise AuditError("CanaryAuditCallback cannot check an iterable (streaming) train dataset before training",
                         fix="train on a map-style dataset (the one inject_canaries returned), or pass preflight=False")
    return trainer_preflight(dataset, collate, tokenizer, canaries)


def _save_weights(model: Any, tokenizer: Any, out: Path) -> dict[str, Path]:
    """Save what was trained as safetensors: the adapter of a PEFT model (``adapter=``), else the full model (``model=``)."""
    if getattr(model, "peft_config", None):
        path = out / "adapter"
        model.save_pretrained(str(path), safe_serialization=True)
        return {"adapter": path}
    path = out / "model"
    model.save_pretrained(str(path), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return {"model": path}


def _measure_command(gt: Path, weights: dict[str, Path]) -> str:
    flag, path = next(iter(weights.items()))
    return f"audit measure {gt} --{flag} {path}"
