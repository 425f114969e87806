"""Fine-tuning through TRL's ``SFTTrainer``: LoRA (PEFT) or full. The only code that imports trl and peft.

Device-aware defaults: TRL's ``SFTConfig`` turns on bf16 and gradient checkpointing, which on a CPU without
native bf16 makes a step about 24x slower (1.2 s -> 29 s for SmolLM2 LoRA, measured). ``precision: auto`` and
``gradient_checkpointing: auto`` therefore mean fp32 and off on CPU, bf16 and off on CUDA.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from audit.models import fingerprint_safetensors_dir
from audit.schema import TrainingSection, TrainSummary


@dataclass(frozen=True)
class DeviceChoice:
    device: str
    precision: str
    gradient_checkpointing: bool

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]


def choose_device(section: TrainingSection) -> DeviceChoice:
    """Resolve ``auto`` settings from the hardware: fp32 without checkpointing on CPU, bf16 on CUDA."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = section.precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    checkpointing = section.gradient_checkpointing
    if checkpointing == "auto":
        checkpointing = False
    return DeviceChoice(device=device, precision=precision, gradient_checkpointing=bool(checkpointing))


@dataclass
class TrainResult:
    model: Any
    """The trained model: a ``PeftModel`` for LoRA (``disable_adapter()`` gives the base), else the full model."""
    summary: TrainSummary | None
    """None only on the non-main processes of a distributed run, which leave after training."""
    loss_history: list[tuple[int, float]] = field(default_factory=list)


def train_sft(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    *,
    section: TrainingSection,
    seed: int,
    work_dir: Path,
    weights_dir: Path,
    device: DeviceChoice,
    on_loss: Callable[[int, float], None] | None = None,
    progress: bool = True,
    resume_from_checkpoint: Path | None = None,
    report_to: str = "none",
) -> TrainResult:
    """Fine-tune ``model`` on ``texts`` and save the weights (adapter or full) as safetensors in ``weights_dir``.

    Checkpoints (``section.checkpoint_every``) go to ``work_dir/checkpoint-<step>``; ``resume_from_checkpoint``
    continues from one with the optimizer, scheduler, RNG and data position restored (see :mod:`audit.resume`).
    """
    from audit.progress import start_heartbeat  # import, tokenize, build: a minute under load before the bar

    beat = start_heartbeat("train", f"building the trainer ({len(texts)} texts)", enabled=progress)
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    peft_config = None
    if section.method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=section.lora.r, lora_alpha=section.lora.alpha, lora_dropout=section.lora.dropout,
            target_modules=list(section.lora.target_modules), task_type="CAUSAL_LM",
        )
    config = SFTConfig(
        output_dir=str(work_dir),
        num_train_epochs=section.epochs,
        per_device_train_batch_size=section.batch_size,
        gradient_accumulation_steps=section.gradient_accumulation_steps,
        learning_rate=section.learning_rate,
        lr_scheduler_type=section.lr_scheduler,
        warmup_steps=section.warmup_steps,
        logging_steps=section.logging_steps,
        save_strategy="steps" if section.checkpoint_every > 0 else "no",
        save_steps=section.checkpoint_every if section.checkpoint_every > 0 else 500,
        save_total_limit=1,
        report_to=report_to,  # "mlflow": TRL's MLflowCallback logs into the active (train stage) run, see audit.tracking
        use_cpu=device.device == "cpu",
        bf16=device.precision == "bf16",
        fp16=device.precision == "fp16",
        gradient_checkpointing=device.gradient_checkpointing,
        max_length=section.max_length,
        packing=bool(section.packing),
        packing_strategy=section.packing or "bfd",
        truncation_mode="keep_start",  # what the pre-flight replays (audit.ground_truth.training_options)
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        dataset_text_field="text",
        disable_tqdm=True,
    )
    history: list[tuple[int, float]] = []

    class _LossAndProgress(TrainerCallback):
        """One quiet progress bar with the running loss, instead of TRL's printed log dicts."""

        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            beat.stop()
            if progress:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=state.max_steps, desc="train", unit="step", leave=False)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                history.append((state.global_step, float(logs["loss"])))
                if on_loss is not None:
                    on_loss(state.global_step, float(logs["loss"]))
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[_LossAndProgress()],
    )
    for quiet in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(quiet)
    # counted before train(): FSDP / ZeRO-3 shard the parameters once training starts
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in trainer.model.parameters())
    start = time.perf_counter()
    beat.step("preparing the first step")
    output = trainer.train(resume_from_checkpoint=str(resume_from_checkpoint) if resume_from_checkpoint else None)
    beat.stop()
    wall = time.perf_counter() - start
    trained = trainer.model
    trained.eval()
    weights_dir.mkdir(parents=True, exist_ok=True)
    distributed = trainer.accelerator.num_processes > 1
    if distributed:  # gathered from every process, written by rank 0 (audit.distributed)
        from audit.distributed import save_weights

        if not save_weights(trainer, weights_dir):
            return TrainResult(model=trained, summary=None, loss_history=history)
    else:
        trained.save_pretrained(str(weights_dir), safe_serialization=True)
    if section.method == "full":
        tokenizer.save_pretrained(str(weights_dir))
    merged_dir = merged_fp = None
    if section.method == "lora" and section.save_merged:
        if distributed:
            print("[audit] training.save_merged is skipped under accelerate launch: the in-memory model is sharded; "
                  "merge the saved adapter in a single process", file=sys.stderr, flush=True)
        else:
            merged_dir = weights_dir.parent / "merged"
            merged_fp = save_merged(trained, tokenizer, merged_dir)
    summary = TrainSummary(
        method=section.method,
        steps=int(output.global_step),
        final_loss=history[-1][1] if history else float(output.training_loss),
        wall_s=round(wall, 3),
        trainable_params=n_trainable,
        total_params=n_total,
        device=device.device,
        precision=device.precision,
        gradient_checkpointing=device.gradient_checkpointing,
        weights_path=str(weights_dir),
        weights_fingerprint=fingerprint_safetensors_dir(weights_dir),
        merged_path=None if merged_dir is None else str(merged_dir),
        merged_fingerprint=merged_fp,
    )
    return TrainResult(model=trained, summary=summary, loss_history=history)


def merged_copy(peft_model: Any) -> Any:
    """The adapter folded into a copy of its base (``W + B A * alpha / r``); ``peft_model`` itself is left intact.

    ``merge_and_unload`` rewrites the base layers in place, so it runs on a deep copy: the caller keeps scoring the
    adapter model (whose ``disable_adapter()`` is the base) afterwards.
    """
    import copy

    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.eval()
    return merged


def save_merged(peft_model: Any, tokenizer: Any, out_dir: Path) -> str:
    """Save the merged weights (safetensors) and tokenizer to ``out_dir``; return their fingerprint."""
    merged = merged_copy(peft_model)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    del merged
    return fingerprint_safetensors_dir(out_dir)
