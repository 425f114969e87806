"""The audit's ground truth as one stage: canaries -> corpus -> injection -> pre-flight -> exposure references.

``audit run`` and ``audit inject`` both call :func:`prepare_ground_truth`, so the standalone stage and the full
audit plant exactly the same canaries in exactly the same places. It runs before the run directory is created:
a bad spec, a corpus that already contains a secret, or a canary the trainer would never see (pre-flight) stops
the audit with one line and leaves nothing behind.

Run-directory files (:func:`write_ground_truth`)::

    canaries.jsonl   canaries WITH their secrets: confidential, never logged to MLflow
    manifest.json    seed, canary-set hash, dataset fingerprints before / after, every placement, works provenance
    preflight.json   what the pre-flight checks looked at and found (ids only)
    works.json       provenance of each sample work (works spec only; no text)
    train.jsonl      the injected training set (``audit inject`` only; it holds the secrets too)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit.canaries import GenerationContext, generate_canaries, load_spec, reference_secrets, spec_needs_model
from audit.canaries.spec import CanarySpec
from audit.corpus import load_corpus
from audit.inject import InjectionResult, inject
from audit.preflight import require_passed, run_preflight, training_texts
from audit.schema import SCHEMA_VERSION, CanarySet, PreflightReport, Recipe, TrainingSection
from audit.store import write_json, write_jsonl


@dataclass(frozen=True)
class GroundTruth:
    spec: CanarySpec
    canaries: CanarySet
    corpus_format: str
    injection: InjectionResult
    preflight: PreflightReport
    training_texts: list[str]
    """What the trainer sees, one string per injected record (chat records rendered with the chat template)."""
    reference_secrets: list[str]
    """Secrets each canary's exposure is ranked against (from the canaries' own distribution)."""
    timings_s: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Counts, hashes and timings for report.json and logs: never secret text."""
        from audit.canaries import describe

        return {**describe(self.canaries), "exposure_references": len(self.reference_secrets),
                "corpus_format": self.corpus_format, "placement": self.injection.manifest.placement_mode,
                "placements": len(self.injection.manifest.placements),
                "preflight": {"passed": self.preflight.passed, "checked": self.preflight.placements_checked,
                              "canary_tokens_max": self.preflight.canary_tokens_max,
                              "record_tokens_max": self.preflight.record_tokens_max, "loss": self.preflight.loss},
                "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()}}


def load_tokenizer(path: Path, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def training_options(section: TrainingSection) -> dict[str, Any]:
    """The trainer settings that decide which tokens carry loss (read with defaults: older recipes lack them)."""
    packing = getattr(section, "packing", False)
    if packing is True:
        packing = getattr(section, "packing_strategy", "bfd")
    return {"max_length": section.max_length, "truncation_mode": getattr(section, "truncation_mode", "keep_start"),
            "packing": packing or False, "assistant_only_loss": bool(getattr(section, "assistant_only_loss", False)),
            "completion_only_loss": bool(getattr(section, "completion_only_loss", False))}


def prepare_ground_truth(recipe: Recipe, *, tokenizer: Any, sampler: Any = None, exposure_references: int | None = None,
                         progress: bool = False) -> GroundTruth:
    """Generate the canaries, plant them, prove they reach the loss, and draw the exposure references."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    spec = load_spec(recipe.canaries.spec, recipe.canaries.params)
    ctx = GenerationContext(tokenizer=tokenizer, sampler=sampler, progress=progress)
    canaries = generate_canaries(spec, seed=recipe.seed, tiers=recipe.canaries.tiers,
                                 members_per_tier=recipe.canaries.members_per_tier, references=recipe.canaries.references,
                                 context=ctx)
    timings["canaries"] = time.perf_counter() - t

    t = time.perf_counter()
    c = recipe.corpus
    corpus = load_corpus(c.source, text_column=c.text_column, max_records=c.max_records, builtin_n=c.builtin_records,
                         seed=recipe.seed, format=c.format, messages_column=c.messages_column)
    timings["corpus"] = time.perf_counter() - t

    t = time.perf_counter()
    injection = inject(corpus.records, canaries, seed=recipe.seed, text_column=c.text_column, corpus_source=c.source,
                       format=corpus.format, messages_column=c.messages_column, mode=c.placement)
    timings["inject"] = time.perf_counter() - t

    t = time.perf_counter()
    texts = training_texts(injection.records, format=corpus.format, text_column=c.text_column,
                           messages_column=c.messages_column, tokenizer=tokenizer)
    options = training_options(recipe.training)
    preflight = run_preflight(injection.manifest, canaries, injection.records, tokenizer, **options,
                              all_training_texts=texts if options["packing"] == "wrapped" else None)
    require_passed(preflight)
    timings["preflight"] = time.perf_counter() - t

    t = time.perf_counter()
    n_refs = recipe.scoring.exposure_references if exposure_references is None else exposure_references
    refs = reference_secrets(spec, canaries, n=n_refs, seed=recipe.seed, context=ctx)
    timings["references"] = time.perf_counter() - t
    return GroundTruth(spec=spec, canaries=canaries, corpus_format=corpus.format, injection=injection, preflight=preflight,
                       training_texts=texts, reference_secrets=refs, timings_s=timings)


def ground_truth_for_model(recipe: Recipe, *, model_path: Path, fingerprint: str, device: str = "cpu", dtype: Any = None,
                           progress: bool = False) -> GroundTruth:
    """:func:`prepare_ground_truth` with the tokenizer of ``model_path`` and, if the spec samples, the model itself."""
    tokenizer = load_tokenizer(model_path, trust_remote_code=recipe.model.trust_remote_code)
    sampler = None
    if spec_needs_model(load_spec(recipe.canaries.spec, recipe.canaries.params)):
        from audit.canaries.sampling import LazyModelSampler

        sampler = LazyModelSampler(model_path, fingerprint=fingerprint, device=device, dtype=dtype,
                                   trust_remote_code=recipe.model.trust_remote_code, tokenizer=tokenizer)
    return prepare_ground_truth(recipe, tokenizer=tokenizer, sampler=sampler, progress=progress)


def ground_truth_files(truth: GroundTruth, *, dataset: bool = False) -> dict[str, Any]:
    """Run-directory file name -> object (``.jsonl``: a list of rows)."""
    files: dict[str, Any] = {"canaries.jsonl": truth.canaries.canaries, "manifest.json": truth.injection.manifest,
                             "preflight.json": truth.preflight}
    if truth.canaries.works:
        files["works.json"] = {"schema_version": SCHEMA_VERSION, "works": [w.model_dump(mode="json") for w in truth.canaries.works]}
    if dataset:
        files["train.jsonl"] = truth.injection.records
    return files


def write_ground_truth(truth: GroundTruth, run_dir: Path, *, dataset: bool = False) -> None:
    for name, obj in ground_truth_files(truth, dataset=dataset).items():
        (write_jsonl if name.endswith(".jsonl") else write_json)(run_dir / name, obj)
