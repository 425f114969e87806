"""The measuring part of a memorization curve: the canaries scored on a live model at a training step.

Shared by :class:`audit.integrations.callback.CanaryAuditCallback` (a user's own Trainer) and ``audit run`` with
``scoring.every_steps`` (:func:`run_curve_callback`, added to the train stage by :mod:`audit.pipeline.stages`). It imports
nothing of the pipeline, so the train stage can use it without a cycle through :mod:`audit.pipeline.measure`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from audit.core.curves import Curves, add_point, read_curves, write_curves
from audit.core.errors import AuditError
from audit.core.schema import CanarySet, Recipe, ScoringSection, SequenceScore

# --------------------------------------------------------------------------------------------------- curve points


def point_metrics(scores: list[SequenceScore], section: ScoringSection, *, space_bits: float) -> dict[str, float]:
    """The flat metrics of one curve point (base and tuned rows of the same canaries), tuned-side keys only, and no
    difference to base over fewer secrets than the disclosure rule allows (:mod:`audit.metrics.disclosure`): the
    points go to MLflow while training runs."""
    from audit.metrics.disclosure import shareable_metrics
    from audit.metrics.suite import summarize_scores
    from audit.report import summarize_tiers

    entries = {key: e for t in summarize_tiers(scores) for key, e in t.flat_metrics().items()}
    entries.update(summarize_scores(scores, section).metrics)
    shared, _ = shareable_metrics(entries, space_bits=space_bits)
    return {k: float(e.value) for k, e in sorted(shared.items()) if not k.endswith("/base") and not math.isnan(e.value)}



@contextmanager
def measuring(model: Any):
    """``model`` in eval mode with every RNG state saved: training after a point runs exactly as it would have without
    it (dropout, data order); train mode is restored. Eval mode is set before the scoring backend casts the model (a
    rounding cast scores a copy, which keeps the mode it was copied in), and outside inference_mode (an in-place upcast
    under it would leave inference tensors in the trained weights); the engine runs its passes under inference_mode."""
    import random

    import numpy as np
    import torch

    was_training = model.training
    py, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        model.eval()
        try:
            yield model
        finally:
            random.setstate(py)
            np.random.set_state(np_state)
            if was_training:
                model.train()


class CurveRecorder:
    """The measuring part: score the canaries on a live model and keep (and report) the point's metrics.

    Shared by :class:`CanaryAuditCallback` and ``audit run`` with ``scoring.every_steps`` (:func:`run_curve_callback`).
    """

    def __init__(self, *, canaries: CanarySet, reference_secrets: list[str], section: Any, seed: int, tokenizer: Any,
                 base_scores: list[SequenceScore] | None = None,
                 on_point: Callable[[int, dict[str, float]], None] | None = None, progress: bool = False,
                 works: Any = None) -> None:
        self.canaries, self.references, self.section, self.seed = canaries, reference_secrets, section, seed
        self.works = works
        """:class:`audit.data.works.subjects.WorksPlan`: whole works scanned at each point too (tuned-side metrics)."""
        self.progress = progress
        self.tokenizer = tokenizer
        self.base_scores = base_scores
        self.on_point = on_point
        self.curves: Curves = {}
        self.seconds = 0.0
        self.points = 0

    def _backend(self, model: Any) -> Any:
        """``model`` as the recipe scores it (``scoring.backend`` in ``scoring.precision``), for a ``with`` block."""
        from audit.score.backend import open_backend

        return open_backend(self.section.backend, model, self.tokenizer, precision=self.section.precision,
                            batch_size=self.section.batch_size)

    def _score(self, model: Any, label: str) -> list[SequenceScore]:
        from audit.score.canaries import score_canaries

        with measuring(model), self._backend(model) as backend:
            return score_canaries(backend, self.tokenizer, self.canaries, self.references, label=label,
                                  section=self.section, progress=False, seed=self.seed)

    def _works(self, model: Any) -> dict[str, float]:
        """The whole works' tuned-side metrics at this point (no base number, no difference to base: the points go to
        MLflow while training runs)."""
        from audit.data.works.summary import summarize_whole_works
        from audit.metrics.disclosure import DIFFERENCE_FAMILIES
        from audit.score.works_scan import ScanSettings, backend_scorer, scan_works

        w = self.works.section
        with measuring(model), self._backend(model) as backend:
            rows = scan_works(self.works.scan_inputs(self.tokenizer), model="tuned", score=backend_scorer(backend),
                              settings=ScanSettings(prefix=w.prefix_tokens, suffix=w.suffix_tokens, stride=w.stride))
        result = summarize_whole_works(self.works, rows, n_queries=self.section.np_extraction_queries,
                                       p=self.section.np_extraction_probability, trainable_params=0, seed=self.seed)
        return {k: float(e.value) for k, e in result.metrics.items()
                if k.endswith("/tuned") and k.split("/")[0] not in DIFFERENCE_FAMILIES}

    def score_base(self, model: Any) -> None:
        """The base rows for every point: a PEFT model with its adapter disabled, else ``model`` as it is now."""
        if self.base_scores is not None:
            return
        import time

        t = time.perf_counter()
        if hasattr(model, "disable_adapter") and getattr(model, "peft_config", None):
            with model.disable_adapter():
                self.base_scores = self._score(model, "base")
        else:
            self.base_scores = self._score(model, "base")
        self.seconds += time.perf_counter() - t

    def measure(self, model: Any, step: int) -> dict[str, float]:
        import time

        from audit.core.progress import heartbeat

        self.score_base(model)
        t = time.perf_counter()
        assert self.base_scores is not None
        with heartbeat(f"curve point at step {step}", enabled=self.progress) as beat:  # minutes on a loaded CPU
            beat.step(f"scoring {len(self.canaries.canaries)} canaries on the live model")
            metrics = point_metrics(self.base_scores + self._score(model, "tuned"), self.section,
                                    space_bits=self.canaries.space.log2_size)
            if self.works is not None:
                beat.step(f"scanning {len(self.works.subjects)} whole works on the live model")
                metrics.update(self._works(model))
        add_point(self.curves, step, metrics)
        self.seconds += time.perf_counter() - t
        self.points += 1
        if self.on_point is not None:
            self.on_point(step, metrics)
        return metrics


def last_step(state: Any) -> bool:
    """The last optimizer step: the final audit measures these weights, so no live point is spent on them."""
    return bool(state.max_steps) and state.global_step >= state.max_steps


def top_exposure(metrics: dict[str, float]) -> str | None:
    """``exposure.mean/rep_<top tier>/tuned``: the one number a progress line shows."""
    keys = [k for k in metrics if k.startswith("exposure.mean/rep_")]
    return max(keys, key=lambda k: int(k.split("/")[1].removeprefix("rep_")), default=None)


def sharded_parameters(args: Any) -> bool:
    """FSDP or DeepSpeed ZeRO-3: no single process holds whole parameters."""
    if getattr(args, "fsdp", None):
        return True
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        return bool(is_deepspeed_zero3_enabled())
    except ImportError:
        return False


class MeasurePoints:
    """When to measure: every N steps, after each evaluation, at each epoch's end (any combination)."""

    def __init__(self, every_steps: int, at_evaluate: bool, at_epoch_end: bool) -> None:
        if every_steps < 0:
            raise AuditError(f"every_steps must be 0 (off) or a positive step count, not {every_steps}",
                             fix="pass every_steps=N with N >= 1, or on_evaluate=True / on_epoch_end=True")
        self.every_steps, self.at_evaluate, self.at_epoch_end = every_steps, at_evaluate, at_epoch_end


class CurveCallback(TrainerCallback):
    """The measuring part alone (``audit run`` with ``scoring.every_steps``): a point every N optimizer steps."""

    def __init__(self, recorder: CurveRecorder, *, every_steps: int) -> None:
        self.recorder, self.every_steps = recorder, every_steps
        self.skip = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.skip = sharded_parameters(args) or not state.is_world_process_zero
        if not self.skip:
            self.recorder.score_base(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self.skip and state.global_step % self.every_steps == 0 and not last_step(state):
            self.recorder.measure(model, state.global_step)


def run_curve_callback(run_dir: Path, truth: Any, tokenizer: Any, recipe: Recipe, *, tracker: Any = None,
                       progress: bool = False) -> CurveCallback | None:
    """``audit run`` with ``scoring.every_steps``: the measuring part on the train stage, against the base scores the
    run stored (``scores_base.jsonl``), each point logged as MLflow step metrics and kept in ``curves.json`` (which a
    resumed run continues). None when the curve is off."""
    from audit.core.store import ScoresFile

    if recipe.scoring.every_steps <= 0:
        return None
    base = [s for s in ScoresFile("base").read(run_dir) or [] if s.model == "base"]

    def on_point(step: int, metrics: dict[str, float]) -> None:
        from audit.core.console import say

        write_curves(run_dir, recorder.curves)
        top = top_exposure(metrics)
        say(progress, f"[audit] curve point at step {step}" + (f": {top} {metrics[top]:.2f} bits" if top else ""))
        if tracker is not None:
            tracker.log_metrics(metrics, step=step)

    recorder = CurveRecorder(canaries=truth.canaries, reference_secrets=truth.reference_secrets, section=recipe.scoring,
                             seed=recipe.seed, tokenizer=tokenizer, base_scores=base or None, on_point=on_point,
                             progress=progress, works=truth.works)
    recorder.curves = read_curves(run_dir)
    return CurveCallback(recorder, every_steps=recipe.scoring.every_steps)
