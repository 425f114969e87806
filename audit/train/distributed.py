"""Several processes under ``accelerate launch`` or ``torchrun`` (one per GPU): which process does what.

    accelerate launch --config_file recipes/accelerate/fsdp.yaml -m audit.cli run tinyllama-1.1b/full_fsdp
    torchrun --nproc_per_node 2 -m audit.cli run tiny/lora_cpu --no-tracking      # 2 CPU processes over gloo

Every process validates the recipe, resolves the model and draws the same canaries (deterministic and cheap), and
every process trains and scores: TRL's ``SFTTrainer`` shards the training as the accelerate config says (DDP, FSDP
or DeepSpeed ZeRO-3), and :func:`audit.score.sharded.score_sharded` deals the canaries' exposure work (the
reference ranks and exact walks, most of the scoring time) round-robin over the processes. Everything else happens
once, on the main process (rank 0): it creates the run directory, writes every file, logs to MLflow and prints.
When the run directory is open, rank 0 sends the others one typed message, a :class:`~audit.train.types.TrainPlan`
(run directory; score the base, train, score the tuned weights, or not, as the stored stage files say; checkpoint;
the audit key id and canary-set hash, which every process checks against its own draw before anything runs).
Every process runs the same :func:`audit.pipeline.run_origin`; on the others the stage store is a view of that plan
(:class:`audit.core.store.PlanView`: it runs a stage exactly when rank 0 does, and writes nothing), the tracker a
NullTracker, and nothing is printed, so every collective call (the Trainer's, scoring's gather) is made by all
processes or by none; a resumed run with every stage stored lets the others leave at once (they load the model
training starts from, run no stage and reach the guard that ends them).
After training, ``Trainer.save_model`` gathers the weights from all processes and rank 0 writes them as ordinary
safetensors; once rank 0 has written everything (:func:`barrier`), every process reloads the saved weights as a
single-device model for scoring, since a sharded model cannot run a forward pass on one process alone. Rank 0 alone
then writes the outputs and the report; the others leave after tuned scoring.

Verified here on CPU only: 2 processes with DDP over gloo (``torchrun --nproc_per_node 2 -m audit.cli run
tiny/lora_cpu``; ``accelerate launch`` starts a single process on a CPU-only machine) give one run directory, one
MLflow run and a complete report, trained on both processes' shards of the data (``tests/test_chain.py``, slow), and
scores byte-identical to one process scoring the same weights (``tests/test_score_sharded.py``, slow).
FSDP2 itself, with the launcher's settings from ``recipes/accelerate/fsdp.yaml``, accelerate's ``fsdp2_prepare_model``
and :func:`fsdp_without_casts`, is tested over gloo on CPU: one step, then the gathered state dict, is fp32 and
bit-identical to the unsharded step (``tests/test_accelerate_configs.py``, slow). The Trainer under FSDP is not:
accelerate turns FSDP on only for GPU-like devices (a CPU run trains DDP). ZeRO-3 needs deepspeed and GPUs and was
not run. Several nodes need a run directory every node reads (the others reload rank 0's weights) and one audit key
(``CANARY_AUDIT_KEY`` on every node: a node under another key draws other canaries, and every process refuses).

In one process (plain ``audit run``) every function here is a no-op.
This module imports nothing of ``audit``: it is plumbing under the trainer and the stages.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from audit.train.types import TrainPlan

BARRIER_TIMEOUT = timedelta(hours=6)
"""How long the other processes may wait while rank 0 scores the base model (the default NCCL timeout is 10 min)."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank as the launcher set it (``RANK``; 0 in one process), read without making a process group."""
    return int(os.environ.get("RANK", "0"))


_ALONE = False
"""Set by :func:`alone`: this process runs the pipeline by itself although the launcher started several."""


def is_distributed() -> bool:
    return world_size() > 1 and not _ALONE


@contextmanager
def alone() -> Iterator[None]:
    """Inside, this process is a run of its own: no plan message, no sharded scoring, no process group destroyed.

    For the Trainer callback's final audit, which rank 0 runs by itself after a DDP training: the other ranks are
    not in the pipeline, so a collective call would wait for them until the timeout, and :func:`finish` would destroy
    the process group the Trainer still owns.
    """
    global _ALONE
    before, _ALONE = _ALONE, True
    try:
        yield
    finally:
        _ALONE = before


def _state() -> Any:
    import torch
    from accelerate import PartialState

    # without cpu=True, accelerate sees several CPU processes as one (DistributedType.NO); the Trainer passes it too
    return PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)


def is_main() -> bool:
    return not is_distributed() or _state().is_main_process


def share_plan(make: Callable[[], TrainPlan] | None, *, own: Any = None) -> tuple[TrainPlan, list[Any]]:
    """The one message of a distributed run: rank 0 calls ``share_plan(make)``, every other process ``share_plan(None)``.

    Rank 0's ``make()`` result goes to every process, and every process's ``own`` (what it drew: the canaries'
    audit key id and hash) to every process, in one ``all_gather_object`` (a barrier as well). It is the only
    collective call outside the Trainer, so no sequence of calls has to pair up between the processes. Returns the
    plan and every process's ``own``, by rank; in one process: ``make()`` and ``[own]``.
    """
    if not is_distributed():
        assert make is not None, "a single process is the main process: it makes the plan"
        return make(), [own]
    import torch.distributed as dist

    main = is_main()  # also makes the process group
    box: list[Any] = [None] * world_size()
    dist.all_gather_object(box, (make() if main and make is not None else None, own))
    return box[0][0], [sent for _, sent in box]


def barrier() -> None:
    """Every process waits here until all have reached it (a no-op in one process)."""
    if is_distributed():
        _state().wait_for_everyone()


def finish() -> None:
    """Destroy this process's process group while the interpreter is still whole; every process calls it last.

    A process that exits with a gloo group alive aborts in interpreter finalization ("terminate called without an
    active exception", SIGABRT; pytorch/pytorch#190489): gloo's worker threads still hold work whose tensors need the
    GIL. torchrun then stops the other processes, so a run that finished fails. Nothing collective happens here:
    rank 1 may leave while rank 0 still writes the report. A no-op in one process or before the group exists.
    """
    if not is_distributed():
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def fsdp_without_casts(accelerator: Any) -> None:
    """Under FSDP, let FSDP gather, compute and reduce in the weights' own dtype, as one process does; call it for fp32
    weights (``training.precision`` fp32 and the ``*-mixed`` modes) before the Trainer prepares the model.

    accelerate turns the Trainer's ``bf16=True`` into an FSDP policy of bf16 parameters and bf16 gradient reduction
    (FSDP1 casts the buffers too, RoPE ``inv_freq`` among them). One GPU under ``bf16-mixed`` keeps fp32 weights and
    runs the forward under bf16 autocast, which stays on under FSDP (accelerate's native AMP). Without the policy,
    FSDP2 all-gathers the fp32 shards, autocast rounds what it rounds on one GPU, gradients are reduced in fp32 and
    AdamW updates the fp32 shards: the master copy, saved as it is. The price: fp32 all-gathers move twice the bytes
    of bf16 ones. A no-op without FSDP.
    """
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None:
        plugin.mixed_precision_policy = None  # FSDP1: no MixedPrecision; FSDP2: MixedPrecisionPolicy() (no casts)


def save_weights(trainer: Any, weights_dir: Path) -> bool:
    """Gather the trained weights from every process and write them on rank 0 as safetensors; True on rank 0.

    FSDP / DDP: ``Trainer.save_model`` gathers (FSDP2: the full state dict of the fp32 shards); it also writes
    ``training_args.bin``, a pickle, which is removed: run directories hold safetensors only. DeepSpeed: the fp32 master
    weights (:func:`zero_fp32_state_dict`), not what ``Trainer.save_model`` gathers, the bf16 working copy under bf16.
    """
    if getattr(trainer, "is_deepspeed_enabled", False):
        main = trainer.accelerator.is_main_process
        state = zero_fp32_state_dict(trainer.model, main=main)  # collective: every process gathers
        if main:
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(str(weights_dir), state_dict=state,
                                                                             safe_serialization=True)
    else:
        trainer.save_model(str(weights_dir))
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return False
    (weights_dir / "training_args.bin").unlink(missing_ok=True)
    return True


def zero_fp32_state_dict(model: Any, *, main: bool) -> dict[str, Any] | None:
    """The model's state dict with every trained parameter taken from DeepSpeed's fp32 master copy; on rank 0, on CPU.

    With bf16 (or fp16) on, DeepSpeed trains a 16-bit working copy of the model and keeps the fp32 weights in the
    optimizer, partitioned over the processes; ``zero3_save_16bit_model`` saves the working copy, so the tuned model
    would be rounded to bf16 while the base was scored from fp32. ``safe_get_full_fp32_param`` assembles a trained
    parameter's fp32 master (ZeRO 1, 2 and 3); a frozen one (a LoRA base) has none, and its working copy is gathered
    as it is. Every process must call this (each gather is collective); the others get None. Host memory on rank 0:
    the whole model in fp32, one parameter gathered at a time on the GPU.
    """
    from contextlib import nullcontext

    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    state: dict[str, Any] = {}
    for name, param in model.named_parameters():
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is None:
            with deepspeed.zero.GatheredParameters([param]) if hasattr(param, "ds_id") else nullcontext():
                full = param.data.detach().clone() if main else None
        if main:
            state[name] = full.to("cpu")
    if not main:
        return None
    persistent = set(model.state_dict())  # buffers that are saved (RoPE inv_freq is not), never partitioned
    state.update({name: buffer.detach().to("cpu") for name, buffer in model.named_buffers() if name in persistent})
    return state
