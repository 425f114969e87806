"""Several processes under ``accelerate launch`` (one per GPU): which process does what.

    accelerate launch --config_file recipes/accelerate/fsdp.yaml -m audit.cli run tinyllama-1.1b/full_fsdp

Every process validates the recipe, resolves the model and draws the same canaries (deterministic and cheap), and
every process trains: TRL's ``SFTTrainer`` shards the work as the accelerate config says (DDP, FSDP or DeepSpeed
ZeRO-3). Everything else happens once, on the main process (rank 0): it creates the run directory and sends its
path to the others, writes every file, scores the base model while the others wait, logs to MLflow and prints.
After training, ``Trainer.save_model`` gathers the weights from all processes and rank 0 writes them as ordinary
safetensors; the other processes then leave, and rank 0 reloads the saved weights as a single-device model for
scoring and outputs, since a sharded model cannot run a forward pass on one process alone.

Verified here on CPU only: 2 processes with DDP over gloo (``torchrun --nproc_per_node 2 -m audit.cli run
tiny/lora_cpu``; ``accelerate launch`` starts a single process on a CPU-only machine) give one run directory, one
MLflow run and a complete report, trained on both processes' shards of the data (``tests/test_chain.py``, slow).
FSDP and ZeRO-3 need GPUs and were not run (the build machine has none); their path differs only inside
``Trainer.save_model``.

In one process (plain ``audit run``) every function here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

BARRIER_TIMEOUT = timedelta(hours=6)
"""How long the other processes may wait while rank 0 scores the base model (the default NCCL timeout is 10 min)."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return world_size() > 1


def _state() -> Any:
    import torch
    from accelerate import PartialState

    # without cpu=True, accelerate sees several CPU processes as one (DistributedType.NO); the Trainer passes it too
    return PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)


def is_main() -> bool:
    return not is_distributed() or _state().is_main_process


def from_main(make: Callable[[], T]) -> T:
    """``make()`` on the main process, its result sent to every process (a barrier as well)."""
    if not is_distributed():
        return make()
    from accelerate.utils import broadcast_object_list

    box = [make() if is_main() else None]
    broadcast_object_list(box, from_process=0)
    return box[0]  # type: ignore[return-value]


def worker_train(*, run_dir: Path, model_path: Path, texts: list[str], section: Any, seed: int, device: Any,
                 parent: Any = None, trust_remote_code: bool = False) -> None:
    """A non-main process: wait for rank 0's go-ahead, take part in training, and return (rank 0 does the rest)."""
    from audit import resume
    from audit.models import load_model_and_tokenizer
    from audit.train.sft import train_sft

    model, tokenizer = load_model_and_tokenizer(model_path, dtype=device.torch_dtype, device=device.device,
                                                trust_remote_code=trust_remote_code)
    if parent is not None:
        from audit import chain

        model = chain.start_model(parent, model, device=device, trust_remote_code=trust_remote_code)
    plan = from_main(lambda: None)  # rank 0 sends {"train": bool, "checkpoint": path | None} once the base is scored
    if not plan["train"]:
        return
    weights_dir = run_dir / ("adapter" if section.method == "lora" else "model")
    train_sft(model, tokenizer, texts, section=section, seed=seed, work_dir=run_dir / resume.TRAINER_DIR,
              weights_dir=weights_dir, device=device, progress=False, resume_from_checkpoint=plan["checkpoint"])


def save_weights(trainer: Any, weights_dir: Path) -> bool:
    """Gather the trained weights from every process and write them on rank 0 as safetensors; True on rank 0.

    ``Trainer.save_model`` knows how to gather FSDP (full state dict) and ZeRO-3 (16-bit gather) shards; it also
    writes ``training_args.bin``, a pickle, which is removed: run directories hold safetensors only.
    """
    trainer.save_model(str(weights_dir))
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return False
    (weights_dir / "training_args.bin").unlink(missing_ok=True)
    return True


def reload_trained(trained: Any, *, model_path: Path, weights_dir: Path, device: Any, parent: Any = None,
                   trust_remote_code: bool = False) -> Any:
    """On rank 0 after distributed training: the saved weights as a single-device model (no-op in one process)."""
    if not is_distributed():
        return trained
    from audit.models import load_model_and_tokenizer
    from audit.train.sft import TrainResult

    if trained.summary.method == "lora":
        from peft import PeftModel

        base, _ = load_model_and_tokenizer(model_path, dtype=device.torch_dtype, device=device.device,
                                           trust_remote_code=trust_remote_code)
        if parent is not None:
            from audit import chain

            base = chain.start_model(parent, base, device=device, trust_remote_code=trust_remote_code)
        model = PeftModel.from_pretrained(base, str(weights_dir))
    else:
        model, _ = load_model_and_tokenizer(weights_dir, dtype=device.torch_dtype, device=device.device,
                                            trust_remote_code=trust_remote_code)
    model.eval()
    return TrainResult(model=model, summary=trained.summary, loss_history=trained.loss_history)
