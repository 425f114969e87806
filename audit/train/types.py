"""Types the trainer, the pipeline and the other processes of a distributed run share. Torch-free.

They live here, not in :mod:`audit.train.sft` (which imports torch and trl), so the modules that only pass them
along (:mod:`audit.pipeline.stages`, :mod:`audit.train.distributed`, :mod:`audit.pipeline.origin`) can name them
without importing the
trainer, and without an import cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit.core.errors import AuditError
from audit.core.schema import TrainSummary

TRAINER_DIR = "trainer"
"""Trainer checkpoints while training runs (``<run_dir>/trainer/checkpoint-<step>``)."""


@dataclass(frozen=True)
class DeviceChoice:
    """Where and in which precision this run computes (resolved from ``auto`` by :func:`audit.train.sft.choose_device`)."""

    device: str
    precision: str
    """``fp32``, ``bf16`` / ``fp16`` (weights in that dtype), or ``bf16-mixed`` / ``fp16-mixed`` (fp32 weights, autocast)."""
    gradient_checkpointing: bool

    @property
    def torch_dtype(self) -> Any:
        """The dtype the weights are loaded and trained in (fp32 for the mixed modes)."""
        import torch

        return getattr(torch, LOAD_DTYPES[self.precision])

    @property
    def autocast(self) -> str | None:
        """``bf16`` / ``fp16`` when the Trainer runs the forward pass under that autocast, else None."""
        return {"bf16": "bf16", "bf16-mixed": "bf16", "fp16": "fp16", "fp16-mixed": "fp16"}.get(self.precision)


LOAD_DTYPES = {"fp32": "float32", "bf16-mixed": "float32", "fp16-mixed": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""The torch dtype (by name) the weights are loaded in, per precision mode: the mixed modes keep fp32 weights."""


@dataclass
class TrainResult:
    model: Any
    """The trained model: a ``PeftModel`` for LoRA (``disable_adapter()`` gives the base), else the full model."""
    summary: TrainSummary | None
    """None only on the non-main processes of a distributed run (rank 0 alone writes train.json and reports)."""
    loss_history: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class WeightsLayer:
    """One fine-tune's saved weights: a LoRA adapter to put on the model below it, or full weights that replace it."""

    method: str
    """``lora`` or ``full``."""
    path: Path


@dataclass(frozen=True)
class TrainPlan:
    """The one message rank 0 sends the other processes of ``accelerate launch`` / ``torchrun``: which stages they join.

    Rank 0 decides from what the run directory holds when the run opens (before the base is scored): a stored
    ``scores_base.jsonl`` / ``train.json`` / ``scores_tuned.jsonl`` means that stage is not run again, so the others
    skip it too. The others wait for this plan and act on it (their stage store is a view of it,
    :class:`audit.core.store.PlanView`); every collective call after it (the Trainer's,
    :func:`audit.score.sharded.score_sharded`'s) sits in a stage both sides run or both skip, so the two sides cannot
    drift apart, and a resumed run with everything stored lets the others leave at once.
    """

    run_dir: Path
    train: bool
    """False when the train stage is already on disk (a resumed run): the other processes do not train."""
    checkpoint: Path | None = None
    """Continue from this Trainer checkpoint (``audit run --resume`` of a run killed mid-training)."""
    method: str = "lora"
    score_base: bool = False
    """The base scores are not stored: every process takes a share of base scoring (the origin decides whether it
    scores at all: a further tune inherits its parent's base scores, on every process alike)."""
    score_tuned: bool = False
    """The tuned scores are not stored: every process reloads the tuned weights and takes a share of scoring them."""
    key_id: str | None = None
    """The public id of the audit key rank 0 drew the canaries under (:mod:`audit.core.keys`; None: an unkeyed set)."""
    canary_set_sha256: str = ""
    """Rank 0's canary set (:meth:`audit.core.schema.CanarySet.sha256`): secrets, roles and ids, so the training data too."""

    def check_drawn(self, drawn: Sequence[tuple[str | None, str]]) -> None:
        """Refuse when a process drew other canaries than rank 0: ``drawn`` is every process's ``(key_id,
        canary_set_sha256)``, by rank, and every process gets the same list, so every process refuses alike.

        The audit key falls back to a per-user file, which each node of a multi-node run may create on its own: the
        ranks would then train on different secrets and score canaries the others never saw, and nothing else notices.
        """
        for rank, (key_id, digest) in enumerate(drawn):
            if (key_id, digest) == (self.key_id, self.canary_set_sha256):
                continue
            other_key = key_id != self.key_id
            raise AuditError(
                f"process {rank} drew other canaries than rank 0: audit key {key_id or 'none'} and canary set "
                f"{digest[:12]} against rank 0's audit key {self.key_id or 'none'} and canary set {self.canary_set_sha256[:12]}",
                fix="give every process the same audit key: the same CANARY_AUDIT_KEY on every node, or CANARY_AUDIT_KEY_FILE "
                    "on a disk every node reads" if other_key else
                    "run every process with the same recipe, overrides and canary-audit version")

    @property
    def work_dir(self) -> Path:
        return self.run_dir / TRAINER_DIR

    @property
    def weights_dir(self) -> Path:
        return self.run_dir / weights_dir_name(self.method)

    def logged_arguments(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """The Trainer's arguments as the train stage logs them to MLflow: ``output_dir`` relative to the run directory.

        A resume reopens the same MLflow stage run, and MLflow refuses to change a logged param. The run directory is
        ``runs/<name>`` (relative) on the first attempt and whatever ``--resume`` was given on a resume (absolute, or
        relative to another working directory), so the raw ``output_dir`` differed and every resume that trained
        printed a false warning; relative to the run directory it is ``trainer`` on every attempt.
        """
        out = arguments.get("output_dir")
        if out is None:
            return dict(arguments)
        try:
            inside = Path(out).resolve().relative_to(self.run_dir.resolve())
        except ValueError:  # not under the run directory: nothing a resume would write differently
            return dict(arguments)
        return {**arguments, "output_dir": inside.as_posix()}


def weights_dir_name(method: str) -> str:
    """``adapter`` for LoRA, ``model`` for a full fine-tune."""
    return "adapter" if method == "lora" else "model"
