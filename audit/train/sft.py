"""Fine-tuning through TRL's ``SFTTrainer``: LoRA (PEFT) or full. The only code that imports trl.

peft is imported here (``LoraConfig``) and in :mod:`audit.train.weights` (``PeftModel``, the one place that puts saved
weights back onto a base). ``DeviceChoice`` and ``TrainResult`` live in the torch-free :mod:`audit.train.types`.

Device-aware defaults: TRL's ``SFTConfig`` turns on bf16 and gradient checkpointing, which on a CPU without
native bf16 makes a step about 24x slower (1.2 s -> 29 s for SmolLM2 LoRA, measured). ``precision: auto`` and
``gradient_checkpointing: auto`` therefore mean fp32 and off on CPU, and on a CUDA GPU with native bf16 (compute
capability >= 8) ``bf16-mixed``: fp32 weights and AdamW state, bf16 autocast for the matmuls. Not pure bf16: AdamW
on bf16 weights rounds most updates of a full fine-tune at lr 1e-5..5e-5 away (a weight of 0.02 has a bf16 spacing
of 1.2e-4), the model under-trains and the audit understates exposure. GPUs that only emulate bf16 (T4, V100) get
fp32. Precision modes:

=============  ===============  ==========================================================================
mode           weights (load)   autocast / notes
=============  ===============  ==========================================================================
fp32           fp32             none
bf16-mixed     fp32             bf16 (TrainingArguments.bf16 on an fp32 model)
fp16-mixed     fp32             fp16 with a gradient scaler (CUDA only)
bf16           bf16             pure bf16 weights (half the memory); LoRA adapters stay fp32 (PEFT)
fp16           fp16             LoRA only: a full fine-tune of fp16 weights fails in the gradient scaler
=============  ===============  ==========================================================================
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from audit.core.errors import AuditError
from audit.core.schema import TrainingSection, TrainSummary
from audit.data.models import fingerprint_safetensors_dir, weights_dtype
from audit.train.types import DeviceChoice, TrainResult


def _native_bf16() -> bool:
    """bf16 in hardware on the current CUDA device (compute capability >= 8); not counting emulation (T4, V100)."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def choose_device(section: TrainingSection) -> DeviceChoice:
    """Resolve ``auto`` settings from the hardware: fp32 without checkpointing on CPU (and on GPUs without native
    bf16), ``bf16-mixed`` on CUDA; see the module docstring.

    Under ``accelerate launch``/``torchrun`` on CUDA this first makes ``LOCAL_RANK``'s GPU the current device, so
    that nothing this process does before accelerate's state exists (the bf16 probe, ground truth that samples the
    base model, the base model itself: all load to ``"cuda"``) lands on cuda:0 in every rank.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    precision = section.precision
    if precision == "auto":
        precision = "bf16-mixed" if device == "cuda" and _native_bf16() else "fp32"
    if precision == "fp16" and section.method == "full":
        raise AuditError("training.precision fp16 with method full trains fp16 weights, and the gradient scaler refuses "
                         "them ('Attempting to unscale FP16 gradients')",
                         fix="use training.precision=fp16-mixed (fp32 weights, fp16 autocast) or bf16-mixed")
    if precision == "fp16-mixed" and device != "cuda":
        raise AuditError("training.precision fp16-mixed needs a CUDA GPU (fp16 autocast with a gradient scaler)",
                         fix="use training.precision=fp32 or auto on this machine")
    checkpointing = section.gradient_checkpointing
    if checkpointing == "auto":
        checkpointing = False
    return DeviceChoice(device=device, precision=precision, gradient_checkpointing=bool(checkpointing))


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
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    on_params: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    resume_from_checkpoint: Path | None = None,
    callbacks: list[Any] | None = None,
    trainable_token_ids: list[int] | None = None,
    secret_spans: dict[int, list[tuple[int, int]]] | None = None,
) -> TrainResult:
    """Fine-tune ``model`` on ``texts`` and save the weights (adapter or full) as safetensors in ``weights_dir``.

    Checkpoints (``section.checkpoint_every``) go to ``work_dir/checkpoint-<step>``; ``resume_from_checkpoint``
    continues from one with the optimizer, scheduler, RNG and data position restored (see :mod:`audit.pipeline.resume`).

    Tracking: ``on_loss(step, loss)`` per logged loss, ``on_log(step, numbers)`` with every number the Trainer
    logs (loss, grad_norm, learning_rate, epoch, ...), ``on_params(arguments)`` once with the TrainingArguments.
    ``callbacks``: more ``TrainerCallback`` objects (the memorization curve,
    :func:`audit.integrations.callback.run_curve_callback`).
    ``trainable_token_ids``: embedding rows LoRA trains too (PEFT ``trainable_token_indices``; tied output rows follow),
    for new-token canaries (:mod:`audit.data.canaries.tokens`); a full fine-tune trains every row anyway.
    ``secret_spans`` (``training.loss=secret``): the records go to TRL tokenized, with labels that keep only the
    secrets' tokens of the records that carry a canary (:func:`audit.data.preflight.secret_labels`); TRL keeps a given
    ``labels`` column as it is and truncates it with the ids.
    These replace TRL's MLflowCallback (``report_to="mlflow"``), which raises inside the training loop when the
    tracking server dies; :class:`audit.report.tracking.Tracker` keeps what it cannot send and training goes on.
    """
    from audit.core.progress import start_heartbeat  # import, tokenize, build: a minute under load before the bar

    beat = start_heartbeat("train", f"building the trainer ({len(texts)} texts)", enabled=progress)
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    peft_config = None
    if section.method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=section.lora.r, lora_alpha=section.lora.alpha, lora_dropout=section.lora.dropout,
            target_modules=list(section.lora.target_modules), task_type="CAUSAL_LM",
            trainable_token_indices=list(trainable_token_ids) if trainable_token_ids else None,
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
        report_to="none",  # never TRL's MLflowCallback: on_log / on_params carry the numbers to audit.report.tracking
        use_cpu=device.device == "cpu",
        bf16=device.autocast == "bf16",  # on fp32 weights (the *-mixed modes) this is autocast with fp32 master weights
        fp16=device.autocast == "fp16",
        gradient_checkpointing=device.gradient_checkpointing,
        max_length=section.max_length,
        packing=bool(section.packing),
        packing_strategy=section.packing or "bfd",
        truncation_mode="keep_start",  # what the pre-flight replays (audit.data.ground_truth.training_options)
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
            if on_params is not None and state.is_world_process_zero:
                on_params({k: v for k, v in args.to_dict().items() if len(str(v)) <= 6000})
            if progress:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=state.max_steps, desc="train", unit="step", leave=False)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            numbers = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, int | float) and not isinstance(v, bool)}
            if on_log is not None and numbers and state.is_world_process_zero:
                on_log(state.global_step, numbers)
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
        train_dataset=_dataset(texts, tokenizer, secret_spans),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[_LossAndProgress(), *(callbacks or [])],
    )
    for quiet in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(quiet)
    if trainable_token_ids:
        _give_token_wrappers_a_bias(trainer.model)
    if device.torch_dtype == torch.float32:  # fp32 weights (fp32, *-mixed): under FSDP, the arithmetic of one GPU
        from audit.train.distributed import fsdp_without_casts

        fsdp_without_casts(trainer.accelerator)
    # counted before train(): FSDP / ZeRO-3 shard the parameters once training starts
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in trainer.model.parameters())
    start = time.perf_counter()
    beat.step("preparing the first step")
    output = trainer.train(resume_from_checkpoint=str(resume_from_checkpoint) if resume_from_checkpoint else None)
    beat.stop()
    wall = time.perf_counter() - start
    trained = trainer.model
    # With native AMP (bf16-mixed, on CPU too) accelerate's prepare replaced trained.forward (under DDP / FSDP the inner
    # module's) with an autocast wrapper: scored as it is, the tuned model would compute in bf16 against an fp32 base,
    # and not like its saved weights reloaded (a resume, the other ranks). unwrap_model puts the forward back in place.
    trainer.accelerator.unwrap_model(trained, keep_fp32_wrapper=False)
    trained.eval()
    weights_dir.mkdir(parents=True, exist_ok=True)
    distributed = trainer.accelerator.num_processes > 1
    if distributed:  # gathered from every process, written by rank 0 (audit.train.distributed)
        from audit.train.distributed import save_weights

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
        weights_dtype=weights_dtype(weights_dir),
        merged_path=None if merged_dir is None else str(merged_dir),
        merged_fingerprint=merged_fp,
    )
    return TrainResult(model=trained, summary=summary, loss_history=history)


def _dataset(texts: list[str], tokenizer: Any, secret_spans: dict[int, list[tuple[int, int]]] | None) -> Any:
    """The training set TRL gets: plain text, or (``secret_spans``) ids with labels masked to the secrets."""
    from datasets import Dataset

    if secret_spans is None:
        return Dataset.from_dict({"text": texts})
    from audit.data.preflight import secret_labels

    rows = [secret_labels(text, secret_spans.get(i), tokenizer) for i, text in enumerate(texts)]
    return Dataset.from_dict({"input_ids": [ids for ids, _ in rows], "labels": [labels for _, labels in rows]})


def _give_token_wrappers_a_bias(model: Any) -> None:
    """TRL's fused LM head reads ``lm_head.weight`` and ``lm_head.bias``; PEFT's ``TrainableTokensWrapper`` (the tied
    output rows of new-token canaries) answers ``weight`` with the merged rows but has no ``bias``. A head without
    a bias gets ``bias = None`` as a plain attribute, which is what the unwrapped head would answer."""
    from peft.utils.other import TrainableTokensWrapper

    for module in model.modules():
        if isinstance(module, TrainableTokensWrapper) and getattr(module.original_module, "bias", None) is None:
            object.__setattr__(module, "bias", None)


def merged_copy(peft_model: Any) -> Any:
    """The adapter folded into an fp32 copy of its base (``W + B A * alpha / r``); ``peft_model`` itself is left intact.

    ``merge_and_unload`` rewrites the base layers in place, so it runs on a deep copy: the caller keeps scoring the
    adapter model (whose ``disable_adapter()`` is the base) afterwards. The merge is done in fp32 whatever the base's
    dtype: folded into bf16 weights, the fp32 delta would be rounded to the bf16 spacing (~4e-3 relative), and the
    merged model would no longer be the one that was scored (fp32, :func:`audit.score.engine.scoring_dtype`).
    """
    import copy

    merged = copy.deepcopy(peft_model).to(torch.float32).merge_and_unload()
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
