"""The release stage: the recipe's ``release`` section made from the run's tuned weights and measured like them.

    audit run tiny/release_cpu        # LoRA tune, then release/merged + release/model.q8_0.gguf + release/model.q4_0.gguf

Each release is read back from the file itself (the merged safetensors loaded; a GGUF dequantized into fp32 by
:func:`audit.pipeline.release.gguf_file.read_gguf`) and scored by :func:`audit.pipeline.stages.score` on the same canaries and
references as the tuned model, under the model label ``release:<format>``. Its scores stay in the run directory
(``release_<format>.json``, a stage checkpoint a resume reuses); its metrics join the report under that label
(:func:`audit.report.releases.release_metrics`), so a gate can hold what is shipped (``exposure.mean/rep_16/release:q4_0``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit.core.layout import LAYOUT, check_version, versioned
from audit.core.schema import SequenceScore


@dataclass(frozen=True)
class Release:
    """One release made and scored: its row of the report (without tiers) and its per-canary scores."""

    label: str
    kind: str
    quantization: str
    path: str
    fingerprint: str
    bytes: int
    seconds: float
    scores: list[SequenceScore] = field(default_factory=list)


@dataclass(frozen=True)
class ReleaseArtifact:
    """``release_<format>.json``: a release's file, fingerprint, size, time and scores (a stage checkpoint)."""

    label: str

    @property
    def name(self) -> str:
        return LAYOUT.release_of(self.label)

    def read(self, run_dir: Path) -> Release | None:
        path = Path(run_dir) / self.name
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        check_version(path, data)
        data.pop("schema_version", None)
        return Release(**{**data, "scores": [SequenceScore.model_validate(s) for s in data["scores"]]})

    def write(self, run_dir: Path, value: Release) -> None:
        from audit.core.store import write_once

        data = versioned(self.name, {**value.__dict__, "scores": [s.model_dump(mode="json") for s in value.scores]})
        write_once(Path(run_dir) / self.name, json.dumps(data, sort_keys=True) + "\n")

    def describe(self, value: Release) -> str:
        return f"release {value.label} ({value.path})"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def merged_model(tuned_model: Any, method: str) -> Any:
    """The tuned weights as one plain model in fp32: a LoRA adapter merged into its base (the same merge as
    ``training.save_merged``), a full fine-tune as it is."""
    import torch

    if method == "lora" and hasattr(tuned_model, "merge_and_unload"):
        from audit.train.sft import merged_copy

        return merged_copy(tuned_model)
    return tuned_model.to(torch.float32)


def make_release(ctx: Any, run_dir: Path, label: str, merged: Any, tokenizer: Any, truth: Any, *,
                 merged_dir: Path | None) -> Release:
    """Write the release ``label`` of ``merged`` (the merged tuned model), read it back from its file and score it."""
    from audit.core.console import say
    from audit.data.models import fingerprint_safetensors_dir, load_causal_lm
    from audit.pipeline import stages
    from audit.pipeline.release.gguf_file import read_gguf, write_gguf

    fmt = label.removeprefix("release:")
    started = time.perf_counter()
    if fmt == "merged":
        if merged_dir is None:  # training.save_merged did not write it: written here, as it would have
            merged_dir = run_dir / LAYOUT.release_dir / "merged"
            merged.save_pretrained(str(merged_dir), safe_serialization=True)
            tokenizer.save_pretrained(str(merged_dir))
        import torch

        model = load_causal_lm(merged_dir, dtype=torch.float32, device=ctx.device.device)
        path, kind, quantization = merged_dir, "merged", "fp32"
        fingerprint, size = fingerprint_safetensors_dir(merged_dir), _dir_bytes(merged_dir)
    else:
        info = write_gguf(merged, tokenizer, run_dir / LAYOUT.release_dir / f"model.{fmt}.gguf", fmt,
                          name=f"{ctx.recipe.name} ({fmt})")
        model = read_gguf(info.path).model.to(ctx.device.device)
        path, kind, quantization, fingerprint, size = info.path, "gguf", fmt, info.sha256, info.bytes
    say(ctx.progress, f"[audit] release {label}: {Path(path).relative_to(run_dir)} ({size / 1e6:.1f} MB), scoring it")
    scores = stages.score(ctx, model, tokenizer, truth, label) or []
    del model
    return Release(label=label, kind=kind, quantization=quantization, path=str(Path(path).relative_to(run_dir)),
                   fingerprint=fingerprint, bytes=size, seconds=round(time.perf_counter() - started, 3), scores=scores)


def make_releases(run: Any, tuned: Any, tokenizer: Any, truth: Any) -> list[Release]:
    """Every release of the recipe's ``release`` section, each made, read back and scored once (reused on resume)."""
    from audit.core.console import say
    from audit.train import distributed

    ctx = run.ctx
    section = ctx.recipe.release
    if section is None or not section.labels:
        return []
    if distributed.is_distributed():
        say(True, "[audit] release: skipped under accelerate launch (the tuned model is sharded); run `audit measure "
                  "--model FILE` on a release afterwards")
        return []
    merged_dir = Path(tuned.summary.merged_path) if tuned.summary.merged_path else None
    needed = [label for label in section.labels if ReleaseArtifact(label).read(run.dir) is None]
    merged = merged_model(tuned.model, tuned.summary.method) if needed else None
    return [run.store.get_or_run(ReleaseArtifact(label), lambda label=label: make_release(
        ctx, run.dir, label, merged, tokenizer, truth, merged_dir=merged_dir)) for label in section.labels]
