"""The train stage: recipe sections and a start model in, trained (or stored) weights out.

It sits below the origins (:mod:`audit.pipeline.origin`): a first tune and a further tune call :func:`train` and keep its
artifact :class:`TrainedWeights`; nothing here knows which origin asked, or imports the pipeline above it. The run
context it reads is the narrow :class:`StageContext` (the pipeline's :class:`audit.pipeline.stages.RunContext` is one).

    load_base        the pretrained weights on the run's device, with the tokens a canary spec adds
    train            TRL training (DP-SGD for ``training.dp``); in a distributed run the saved weights reloaded
    TrainedWeights   ``train.json`` + the weights folder: what resume reads back instead of training again
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from audit.core.console import say
from audit.core.layout import LAYOUT
from audit.core.schema import Recipe, TrainSummary
from audit.core.store import json_text, write_once
from audit.data.models import ResolvedModel
from audit.train import distributed
from audit.train.types import TRAINER_DIR, DeviceChoice, TrainPlan, TrainResult, WeightsLayer, weights_dir_name

if TYPE_CHECKING:
    from audit.report.tracking import RunTracker


class StageContext(Protocol):
    """What the train stage reads of the run: the recipe, the resolved base, the device, the spec's added tokens."""

    recipe: Recipe
    resolved: ResolvedModel
    device: DeviceChoice
    progress: bool

    @property
    def added_tokens(self) -> list[str]: ...


def load_base(ctx: StageContext) -> tuple[Any, Any]:
    """The pretrained weights and their tokenizer, on the run's device and precision, with the tokens the canary spec
    adds (``new_tokens``: :func:`audit.data.models.extend_vocabulary`, the same rows every time the base is loaded)."""
    from audit.data.models import load_model_and_tokenizer

    say(ctx.progress, f"[audit] score base: loading {ctx.recipe.model.source} and its per-token view")
    return load_model_and_tokenizer(ctx.resolved.path, dtype=ctx.device.torch_dtype, device=ctx.device.device,
                                    trust_remote_code=ctx.recipe.model.trust_remote_code, added_tokens=ctx.added_tokens)


@dataclass(frozen=True)
class TrainedWeights:
    """The train stage's artifact: ``train.json`` plus the weights folder it records (fingerprint checked).

    Read back, the weights are put on ``start`` (the model training began from) by :func:`audit.train.weights.load_tuned`.
    """

    ctx: StageContext
    start: Any
    name: str = LAYOUT.train

    def read(self, run_dir: Path) -> TrainResult | None:
        from audit.core.errors import AuditError
        from audit.data.models import fingerprint_safetensors_dir
        from audit.train.weights import load_tuned

        path = Path(run_dir) / LAYOUT.train
        if not path.is_file():
            return None
        summary = TrainSummary.model_validate_json(path.read_text(encoding="utf-8"))
        weights_dir = Path(run_dir) / weights_dir_name(summary.method)
        found = fingerprint_safetensors_dir(weights_dir) if weights_dir.is_dir() else None
        if found != summary.weights_fingerprint:
            raise AuditError(f"{weights_dir} does not hold the weights {LAYOUT.train} recorded (fingerprint {str(found)[:12]} "
                             f"!= {summary.weights_fingerprint[:12]})", fix="start a new run; this one was modified")
        model = load_tuned(self.start, [WeightsLayer(summary.method, weights_dir)], device=self.ctx.device,
                           trust_remote_code=self.ctx.recipe.model.trust_remote_code)
        return TrainResult(model=model, summary=summary)

    def write(self, run_dir: Path, value: TrainResult) -> None:
        """Record the finished train stage, then drop the Trainer checkpoints it no longer needs (the weights are saved)."""
        write_once(Path(run_dir) / LAYOUT.train, json_text(value.summary))
        shutil.rmtree(Path(run_dir) / TRAINER_DIR, ignore_errors=True)

    def describe(self, value: TrainResult) -> str:
        assert value.summary is not None
        return f"trained weights {weights_dir_name(value.summary.method)}/ ({value.summary.steps} steps)"


def train(ctx: StageContext, layers: list[WeightsLayer] | tuple[WeightsLayer, ...], model: Any, tokenizer: Any, truth: Any,
          plan: TrainPlan, *, tracker: RunTracker, progress: bool = False) -> TrainResult:
    """TRL training of ``model`` on the injected texts; with several processes, the saved weights are reloaded (on
    the base with ``layers``, the weights training started from, below them). ``tracker``: a
    :class:`~audit.report.tracking.NullTracker` when tracking is off, and on every process but rank 0."""
    from audit.train.curve_points import run_curve_callback  # scoring.every_steps: the memorization curve (off by default)
    from audit.train.sft import train_sft
    from audit.train.weights import load_tuned

    recipe = ctx.recipe

    def on_loss(step: int, loss: float) -> None:  # train.loss on the parent run
        tracker.log_metrics({"train.loss": loss}, step=step)

    if recipe.training.dp is not None:
        return train_dp(ctx, model, tokenizer, truth, plan, on_loss=on_loss, progress=progress)
    curve = None if distributed.is_distributed() else run_curve_callback(
        plan.run_dir, truth, tokenizer, recipe, tracker=tracker, progress=progress)  # None unless scoring.every_steps
    trained = train_sft(model, tokenizer, truth.training_texts, section=recipe.training, seed=recipe.seed,
                        trainable_token_ids=_added_token_ids(ctx, tokenizer), secret_spans=truth.secret_spans,
                        work_dir=plan.work_dir,
                        weights_dir=plan.weights_dir, device=ctx.device, on_loss=on_loss,
                        on_log=lambda step, logs: tracker.log_stage_metrics(logs, step),  # every number, on the stage run
                        on_params=lambda args: tracker.log_stage_params(plan.logged_arguments(args)), progress=progress,
                        resume_from_checkpoint=plan.checkpoint,
                        callbacks=[curve] if curve is not None else None)
    if not distributed.is_distributed():
        return trained
    # a sharded model cannot run a forward pass on one process: every process (each scores a share) puts the weights
    # rank 0 saved (Trainer.save_model gathered them) on a fresh base, once rank 0 has written all of weights_dir
    # (a full fine-tune's tokenizer is saved after the gather); a full fine-tune's weights replace the base, so no
    # base is loaded for them, and what training left (the trainer, optimizer state) is freed first
    distributed.barrier()
    summary, history = trained.summary, trained.loss_history
    del trained
    release_memory()
    layers = [*layers, WeightsLayer(recipe.training.method, plan.weights_dir)]
    base = None if recipe.training.method == "full" else load_base(ctx)[0]
    model = load_tuned(base, layers, device=ctx.device, trust_remote_code=recipe.model.trust_remote_code)
    return TrainResult(model=model, summary=summary, loss_history=history)


def release_memory() -> None:
    """Collect what is no longer referenced (the Trainer keeps reference cycles) and hand cached GPU blocks back."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _added_token_ids(ctx: StageContext, tokenizer: Any) -> list[int] | None:
    """The ids of the tokens the canary spec added (``new_tokens``), whose rows LoRA trains too; None for other specs."""
    return tokenizer.convert_tokens_to_ids(ctx.added_tokens) if ctx.added_tokens else None


def train_dp(ctx: StageContext, model: Any, tokenizer: Any, truth: Any, plan: TrainPlan, *, on_loss: Any = None,
             progress: bool = False) -> TrainResult:
    """DP-SGD on a LoRA adapter (``training.dp``, :mod:`audit.train.dp`); ``train.json`` records the accountant's eps."""
    from audit.core.errors import AuditError
    from audit.train.dp import train_dp_lora

    if distributed.is_distributed():
        raise AuditError("training.dp runs in one process (Opacus' Poisson sampling and accountant are per process here)",
                         fix="run `audit run` without accelerate launch / torchrun")
    section = ctx.recipe.training
    result = train_dp_lora(model, tokenizer, truth.training_texts, settings=section.dp, lora=section.lora,
                           epochs=section.epochs, batch_size=section.batch_size, learning_rate=section.learning_rate,
                           max_length=section.max_length, seed=ctx.recipe.seed, weights_dir=plan.weights_dir,
                           device=ctx.device.device, progress=progress, on_loss=on_loss,
                           trainable_token_ids=_added_token_ids(ctx, tokenizer), secret_spans=truth.secret_spans)
    return TrainResult(model=result.model, summary=result.summary, loss_history=result.loss_history)
