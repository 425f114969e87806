"""The audit's ground truth as one stage: canaries -> corpus -> injection -> pre-flight -> exposure references.

``audit run``, a further tune (:class:`audit.pipeline.origin.FurtherTune`, which passes its parent's canaries in) and
``audit inject`` call :func:`prepare_ground_truth`; ``audit inject --stream`` (:func:`_inject_streaming`) replays its
steps record by record for corpora that do not fit in memory. So the standalone stage and the full audit plant
exactly the same canaries in exactly the same places. It runs before the run directory is created:
a bad spec, a corpus that already contains a secret, or a canary the trainer would never see (pre-flight) stops
the audit with one line and leaves nothing behind.

Run-directory files (:func:`write_ground_truth`)::

    canaries.jsonl   canaries WITH their secrets: confidential, never logged to MLflow
    canaries.meta.json  the rest of the canary set (schema_version, key id, spec, seed, secret space, works): no secrets
    manifest.json    key id, seed, canary-set hash, dataset fingerprints before / after, every placement, works provenance
    preflight.json   what the pre-flight checks looked at and found (ids only)
    works.json       provenance of each sample work (works spec only; no text)
    train.jsonl      the injected training set (``audit inject`` only; it holds the secrets too)
    train_dataset/   the same as a saved ``datasets`` directory (``audit inject`` only; 0700, files 0600)
    recipe.yaml      the resolved recipe (``audit inject`` only; ``audit run`` writes it too)
    inject.json      what ``audit measure`` needs: base source and fingerprint, spec, seed, key id, dataset files

Secrets, roles, ids and exposure references derive from the audit key (:mod:`audit.core.keys`) as well as the seed;
the key's id is recorded in canaries.meta.json, manifest.json, run.json and report.json, the key never.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit.core.console import text_table
from audit.core.errors import AuditError
from audit.core.keys import AuditKey, resolve_key
from audit.core.layout import LAYOUT
from audit.core.schema import SCHEMA_VERSION, CanarySet, PreflightReport, Recipe, TrainingSection
from audit.core.store import write_json, write_jsonl
from audit.data.canaries import GenerationContext, added_tokens, generate_canaries, load_spec, reference_secrets, spec_needs_model
from audit.data.canaries.generate import check_ids
from audit.data.canaries.spec import CanarySpec
from audit.data.corpus import Corpus, load_corpus
from audit.data.inject import InjectionResult, inject
from audit.data.models import load_tokenizer  # noqa: F401  (the one tokenizer loader; imported from here by callers)
from audit.data.preflight import require_passed, run_preflight, secret_spans, training_texts


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
    secret_spans: dict[int, list[tuple[int, int]]] | None = None
    """``training.loss=secret``: record index -> its secrets' character spans in ``training_texts`` (else None)."""
    extra_files: dict[str, Any] = field(default_factory=dict)
    """More run-directory files the origin adds (``external.json`` of ``audit measure``), written with the rest."""
    works: Any = None
    """:class:`audit.data.works.subjects.WorksPlan` of the recipe's ``works`` section (whole works audited); None without it."""

    def summary(self) -> dict[str, Any]:
        """Counts, hashes and timings for report.json and logs: never secret text."""
        from audit.data.canaries import describe

        return {**describe(self.canaries), "exposure_references": len(self.reference_secrets),
                "corpus_format": self.corpus_format, "placement": self.injection.manifest.placement_mode,
                "placements": len(self.injection.manifest.placements),
                "preflight": {"passed": self.preflight.passed, "checked": self.preflight.placements_checked,
                              "canary_tokens_max": self.preflight.canary_tokens_max,
                              "record_tokens_max": self.preflight.record_tokens_max, "loss": self.preflight.loss},
                "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()}}


def refuse_added_tokens(recipe: Recipe, where: str) -> None:
    """One line for a spec that adds tokens (``new_tokens``) where the run does not own the model's vocabulary: a set
    made for someone else's trainer would reach it as ordinary text pieces, not as the new tokens it was drawn from."""
    spec = load_spec(recipe.canaries.spec, recipe.canaries.params)
    tokens = added_tokens(spec)
    if tokens:
        raise AuditError(f"{where}: canary spec {spec.name} adds {len(tokens)} tokens to the model's "
                         "vocabulary, which only a run that trains the model can do",
                         fix="audit new-token canaries with `audit run` (it adds the tokens, trains and scores), or use "
                             "rare_tokens / bigram")


def training_options(section: TrainingSection) -> dict[str, Any]:
    """The trainer settings that decide which tokens carry loss, as :func:`audit.train.sft.train_sft` passes them to TRL.

    Loss masking is never on in training (every record is trained as plain text, chat records rendered through the
    tokenizer's template), so the pre-flight's loss-mask check guards callers of :func:`run_preflight` that do mask.
    """
    return {"max_length": section.max_length, "truncation_mode": "keep_start", "packing": section.packing,
            "assistant_only_loss": False, "completion_only_loss": False, "secret_only_loss": section.loss == "secret"}


def plant(recipe: Recipe, canaries: CanarySet, corpus: Corpus, *, key: AuditKey | None = None) -> InjectionResult:
    """Inject ``canaries`` into ``corpus`` as the recipe says; ``canaries.inject: false`` plants none of them (a clean
    run that still measures the same set: the manifest keeps the whole set's hash and lists no placement)."""
    c = recipe.corpus
    planted = canaries if recipe.canaries.inject else canaries.model_copy(update={"canaries": canaries.references()})
    injection = inject(corpus.records, planted, seed=recipe.seed, text_column=c.text_column, corpus_source=c.source,
                       format=corpus.format, messages_column=c.messages_column, mode=c.placement, key=key)
    if not recipe.canaries.inject:
        injection = InjectionResult(records=injection.records,
                                    manifest=injection.manifest.model_copy(update={"canary_set_sha256": canaries.sha256()}))
    return injection


def prepare_ground_truth(recipe: Recipe, *, tokenizer: Any, sampler: Any = None, exposure_references: int | None = None,
                         canaries: CanarySet | None = None, canary_seed: int | None = None,
                         progress: bool = False, key: AuditKey | None, corpus: Corpus | None = None) -> GroundTruth:
    """Generate the canaries, plant them, prove they reach the loss, and draw the exposure references.

    ``key``: the audit key everything secret is drawn under (:func:`audit.pipeline.origin.run_key`); None only for a run
    written before the key existed, whose unkeyed canaries are regenerated as they were.
    ``canaries``: an existing set (a further tune's, read from its parent) instead of a new draw. ``canary_seed``:
    the seed the canaries and the exposure references are drawn with (default ``recipe.seed``; a further tune uses
    its chain's first run's, while its corpus and injection use its own ``recipe.seed``). ``corpus``: records already
    in memory (:func:`audit.integrations.api.inject_canaries`) instead of loading ``recipe.corpus.source``.
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    spec = load_spec(recipe.canaries.spec, recipe.canaries.params)
    ctx = GenerationContext(tokenizer=tokenizer, sampler=sampler, progress=progress)
    seed = recipe.seed if canary_seed is None else canary_seed
    if canaries is not None:
        check_ids(canaries, key)  # a stored set: drawn under this key, every secret the one its id was made from
    if canaries is None or not canaries.space.enumerable:
        canaries = draw_canaries(recipe, spec, context=ctx, seed=seed, key=key, stored=canaries)
    timings["canaries"] = time.perf_counter() - t

    t = time.perf_counter()
    c = recipe.corpus
    if corpus is None:
        corpus = load_corpus(c.source, text_column=c.text_column, max_records=c.max_records, builtin_n=c.builtin_records,
                             seed=recipe.seed, format=c.format, messages_column=c.messages_column)
    timings["corpus"] = time.perf_counter() - t

    t = time.perf_counter()
    injection = plant(recipe, canaries, corpus, key=key)
    timings["inject"] = time.perf_counter() - t
    works = None
    if recipe.works is not None:  # whole works as subjects: drawn, then planted after the canaries
        from audit.data.works.subjects import canary_carriers, plan_works, plant_works

        t = time.perf_counter()
        works = plan_works(recipe, tokenizer=tokenizer, sampler=sampler, seed=seed, key=key, corpus=corpus,
                           carriers=canary_carriers(injection.manifest), progress=progress)
        if recipe.canaries.inject:  # a clean further tune measures the works without planting them again
            injection = plant_works(injection, works, canaries=canaries, seed=recipe.seed, key=key, text_column=c.text_column)
        timings["works"] = time.perf_counter() - t

    t = time.perf_counter()
    texts = training_texts(injection.records, format=corpus.format, text_column=c.text_column,
                           messages_column=c.messages_column, tokenizer=tokenizer)
    options = training_options(recipe.training)
    wrapped = texts if options["packing"] == "wrapped" else None
    preflight = run_preflight(injection.manifest, canaries, injection.records, tokenizer, **options, all_training_texts=wrapped)
    if works is not None:
        from audit.data.works.subjects import merge_preflight, works_preflight

        preflight = merge_preflight(preflight, works_preflight(injection, works, tokenizer, seed=seed,
                                                               options={**options, "all_training_texts": wrapped}))
    require_passed(preflight)
    if recipe.training.dp is not None:  # delta < 1/n needs n, the injected record count: checked before anything is written
        from audit.data.validate import check_dp_settings

        check_dp_settings(recipe.training.dp, len(texts))
    timings["preflight"] = time.perf_counter() - t

    t = time.perf_counter()
    n_refs = recipe.scoring.exposure_references if exposure_references is None else exposure_references
    refs = reference_secrets(spec, canaries, n=n_refs, seed=seed, context=ctx, key=key)
    timings["references"] = time.perf_counter() - t
    spans = None
    if recipe.training.loss == "secret":
        if corpus.format != "text":
            raise AuditError("training.loss=secret labels text records; this corpus is chat messages",
                             fix="use training.loss=all with a messages corpus")
        spans = secret_spans(injection.manifest, canaries, injection.records, tokenizer, texts=texts)
    return GroundTruth(spec=spec, canaries=canaries, corpus_format=corpus.format, injection=injection, preflight=preflight,
                       training_texts=texts, reference_secrets=refs, timings_s=timings, secret_spans=spans, works=works)


def draw_canaries(recipe: Recipe, spec: CanarySpec, *, context: GenerationContext, seed: int, key: AuditKey | None,
                  stored: CanarySet | None = None) -> CanarySet:
    """The recipe's canary set drawn in ``context``; with ``stored``, drawn again and required to be that set.

    A sampled space's reference draw depends on the canary draw before it in the same context (the works generator
    keeps the canaries' spans out of the references), so a given sampled set is drawn again before its references
    and must come out the same; a product space's references do not depend on it."""
    drawn = generate_canaries(spec, seed=seed, tiers=recipe.canaries.tiers, members_per_tier=recipe.canaries.members_per_tier,
                              references=recipe.canaries.references, context=context, key=key,
                              inclusion=recipe.canaries.inclusion)
    if stored is not None and drawn.sha256() != stored.sha256():
        raise AuditError(f"the canaries drawn again for spec {spec.name} (seed {seed}) differ from the stored set",
                         fix="the canary code, spec or base model changed since the set was drawn; rerun from its first run")
    return drawn


def ground_truth_for_model(recipe: Recipe, *, model_path: Path, fingerprint: str, device: str = "cpu", dtype: Any = None,
                           progress: bool = False, canaries: CanarySet | None = None,
                           canary_seed: int | None = None, key: AuditKey | None) -> GroundTruth:
    """:func:`prepare_ground_truth` with the tokenizer of ``model_path`` (with the tokens the spec adds) and, if the spec
    samples, the model itself."""
    spec = load_spec(recipe.canaries.spec, recipe.canaries.params)
    tokenizer = load_tokenizer(model_path, trust_remote_code=recipe.model.trust_remote_code, added_tokens=added_tokens(spec))
    sampler = None
    if spec_needs_model(spec) or (recipe.works is not None and "synthetic" in recipe.works.sources):
        from audit.data.canaries.sampling import LazyModelSampler

        sampler = LazyModelSampler(model_path, fingerprint=fingerprint, device=device, dtype=dtype,
                                   trust_remote_code=recipe.model.trust_remote_code, tokenizer=tokenizer)
    return prepare_ground_truth(recipe, tokenizer=tokenizer, sampler=sampler, progress=progress, canaries=canaries,
                                canary_seed=canary_seed, key=key)


def ground_truth_files(truth: GroundTruth, *, dataset: bool = False) -> dict[str, Any]:
    """Run-directory file name -> object (``.jsonl``: a list of rows)."""
    files: dict[str, Any] = {LAYOUT.canaries: truth.canaries.canaries, LAYOUT.canaries_meta: canaries_meta(truth.canaries),
                             LAYOUT.manifest: truth.injection.manifest, LAYOUT.preflight: truth.preflight}
    if truth.canaries.works:
        files[LAYOUT.works] = works_file(truth.canaries)
    files.update(truth.extra_files)
    if dataset:
        files[LAYOUT.train_records] = truth.injection.records
    return files


def works_file(canaries: CanarySet) -> dict[str, Any]:
    """``works.json``: the provenance of each sample work (no text), as a run and ``audit inject`` write it."""
    return {"schema_version": SCHEMA_VERSION, "works": [w.model_dump(mode="json") for w in canaries.works]}


def canaries_meta(canaries: CanarySet) -> dict[str, Any]:
    """``canaries.meta.json``: everything of the :class:`CanarySet` but its rows (which stay, unchanged, in
    ``canaries.jsonl``), so the set can be read back whole: schema_version, spec, seed, space, works, excerpts, hash."""
    meta = canaries.model_dump(mode="json", exclude={"canaries"})
    return {**meta, "canaries_file": LAYOUT.canaries, "n_canaries": len(canaries.canaries),
            "canary_set_sha256": canaries.sha256()}


def read_canary_set(run_dir: Path) -> CanarySet | None:
    """The run's canary set from ``canaries.jsonl`` + ``canaries.meta.json``; None for a run written before the
    sidecar existed (its set can only be regenerated). A sidecar that does not match its rows is an error."""
    import json

    from audit.core.schema import Canary

    meta_path, rows_path = Path(run_dir) / LAYOUT.canaries_meta, Path(run_dir) / LAYOUT.canaries
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise AuditError(f"{meta_path} has schema_version {meta.get('schema_version')}, this version reads {SCHEMA_VERSION}",
                         fix="use a run made by this version of canary-audit")
    rows = [Canary.model_validate_json(line) for line in rows_path.read_text(encoding="utf-8").splitlines() if line]
    expected = meta.pop("canary_set_sha256")
    meta.pop("canaries_file", None)
    meta.pop("n_canaries", None)
    canaries = CanarySet.model_validate({**meta, "canaries": [c.model_dump(mode="json") for c in rows]})
    if canaries.sha256() != expected:
        raise AuditError(f"{rows_path} does not match {meta_path.name} (set hash {canaries.sha256()[:12]} != {expected[:12]})",
                         fix="use an unmodified run directory")
    return canaries


def write_ground_truth(truth: GroundTruth, run_dir: Path, *, dataset: bool = False) -> None:
    for name, obj in ground_truth_files(truth, dataset=dataset).items():
        (write_jsonl if name.endswith(".jsonl") else write_json)(run_dir / name, obj)


# --------------------------------------------------------------------------------------------------- standalone stages


def canaries_table(canaries: CanarySet, *, reveal: bool = False, width: int = 48) -> str:
    """The pool as a table: id, role, prefix, secret (hidden unless ``reveal``: its length only).

    Hidden means no function of the secret but its length: a hash prefix was once shown here, and a lookup table
    over the 10^6 codes of the digits spec turned it back into every secret in seconds. The ids (keyed) are shown."""

    def clip(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 1] + "…"

    works = {w.id: w for w in canaries.works}
    rows = [["id", "role", "source", "prefix", "secret"]]
    for c in sorted(canaries.canaries, key=lambda c: (-c.repetitions, c.id)):
        secret = " ".join(c.secret.split()) if reveal else f"<hidden: {len(c.secret)} chars>"
        source = works[c.work].title[:24] if c.work in works else ""
        rows.append([c.id, f"{c.repetitions}x" if c.is_member else "reference", source, clip(c.prefix), secret])
    if not any(r[2] for r in rows[1:]):
        rows = [r[:2] + r[3:] for r in rows]
    lines = text_table(rows[0], rows[1:])
    space = canaries.space
    key = f"audit key {canaries.key_id}" if canaries.key_id else "unkeyed"
    lines.append(f"spec {canaries.spec} v{canaries.spec_version}, seed {canaries.seed}, "
                 f"{key}: {len(canaries.members())} members, "
                 f"{len(canaries.references())} references; secret space {space.kind}, {space.log2_size:.1f} bits; "
                 f"set sha256 {canaries.sha256()[:16]}")
    for w in canaries.works:
        lines.append(f"work {w.id}  {w.kind:13}  {w.title[:40]!r} ({w.author}); {w.license}; {w.source}; {w.n_chars} chars")
    if not reveal:
        lines.append("secrets are hidden: --reveal shows them (they are the audit's confidential material)")
    return "\n".join(lines)


def model_context(source: str, *, tokenizer_only: bool, progress: bool = False,
                  added_tokens: Sequence[str] = ()) -> tuple[Any, Any, Any]:
    """``(resolved, tokenizer, sampler)`` for a model source (the tokenizer with ``added_tokens``); the sampler loads
    the model lazily."""
    from audit.data.canaries.sampling import LazyModelSampler
    from audit.data.models import resolve_model

    resolved = resolve_model(source, progress=progress)
    tokenizer = load_tokenizer(resolved.path, added_tokens=added_tokens)
    sampler = None if tokenizer_only else LazyModelSampler(
        resolved.path, fingerprint=resolved.provenance.get("weights_fingerprint", ""), tokenizer=tokenizer)
    return resolved, tokenizer, sampler


@dataclass(frozen=True)
class InjectStageResult:
    out_dir: Path
    files: list[str]
    n_records: int
    placements: int
    preflight: PreflightReport
    timings_s: dict[str, float]


def inject_stage(recipe: Recipe, out_dir: Path, *, stream: bool = False, progress: bool = False) -> InjectStageResult:
    """``audit inject``: canaries + injection + pre-flight for ``recipe``, written to ``out_dir`` with ``train.jsonl``.

    ``stream``: the corpus is read and written record by record (memory stays flat for corpora that do not fit);
    the output and manifest are the same as without it.
    """
    from audit.data.models import resolve_model
    from audit.data.validate import check_new_output_dir

    out_dir = Path(out_dir)
    refuse_added_tokens(recipe, "audit inject")
    if stream and recipe.works is not None:
        raise AuditError("audit inject --stream cannot plant whole works (they are drawn from and placed in the whole set)",
                         fix="run `audit inject` without --stream for a recipe with a works section")
    check_new_output_dir(out_dir, fix="give a new or empty --out directory in a folder you can write")
    resolved = resolve_model(recipe.model.source, revision=recipe.model.revision, progress=progress)
    fingerprint = resolved.provenance.get("weights_fingerprint", "")
    key = resolve_key(recipe.canaries.key_file)
    with _removed_on_failure(out_dir):  # a failure (bad UTF-8 mid-stream, pre-flight, disk full) leaves no output
        if not stream:
            truth = ground_truth_for_model(recipe, model_path=resolved.path, fingerprint=fingerprint, progress=progress, key=key)
            out_dir.mkdir(parents=True, exist_ok=True)
            files = list(ground_truth_files(truth, dataset=True))
            write_ground_truth(truth, out_dir, dataset=True)
            result = InjectStageResult(out_dir=out_dir, files=files, n_records=len(truth.injection.records),
                                       placements=len(truth.injection.manifest.placements), preflight=truth.preflight,
                                       timings_s=truth.timings_s)
        else:
            result = _inject_streaming(recipe, out_dir, model_path=resolved.path, fingerprint=fingerprint, progress=progress,
                                       key=key)
        t = time.perf_counter()
        result.files.extend(write_measure_record(recipe, out_dir, resolved=resolved))
        result.timings_s["record"] = time.perf_counter() - t
        return result


@contextmanager
def _removed_on_failure(out_dir: Path) -> Iterator[None]:
    """On an exception, remove what the block created for ``out_dir``: the topmost folder of it that did not exist
    before (``--out a/b/c`` with no ``a`` removes ``a``), or, when ``out_dir`` existed (empty), the files made in it.
    A folder that existed before is never removed."""
    import shutil

    new_top = None
    for folder in [out_dir, *out_dir.parents]:
        if folder.exists():
            break
        new_top = folder
    try:
        yield
    except BaseException:
        if new_top is not None:
            shutil.rmtree(new_top, ignore_errors=True)
        elif out_dir.is_dir():
            for child in out_dir.iterdir():  # it was empty (checked above)
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise


def write_measure_record(recipe: Recipe, out_dir: Path, *, resolved: Any) -> list[str]:
    """``recipe.yaml`` (the resolved recipe), ``inject.json`` and ``train_dataset/`` beside what ``audit inject`` wrote.

    The exposure references are not stored: ``audit measure`` draws them again from the spec, the seed and the audit
    key exactly as ``audit run`` does (:func:`prepare_ground_truth`), and checks that the injection it draws again
    reproduces ``manifest.json``. ``train_dataset/`` is 0700 with 0600 files, like ``train.jsonl``."""
    import json

    import yaml

    from audit.core.schema import InjectionManifest
    from audit.core.store import atomic_write_text
    from audit.data.models import fingerprint_safetensors_dir

    out_dir = Path(out_dir)
    manifest = InjectionManifest.model_validate_json((out_dir / LAYOUT.manifest).read_text(encoding="utf-8"))
    meta = json.loads((out_dir / LAYOUT.canaries_meta).read_text(encoding="utf-8"))
    fingerprint = resolved.provenance.get("weights_fingerprint") or fingerprint_safetensors_dir(resolved.path)
    atomic_write_text(out_dir / LAYOUT.recipe, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    c = recipe.corpus
    record = {
        "schema_version": SCHEMA_VERSION,
        "base": {"source": recipe.model.source, "revision": recipe.model.revision, "kind": resolved.kind,
                 "fingerprint": fingerprint},
        "recipe": LAYOUT.recipe,
        "spec": manifest.spec, "spec_version": manifest.spec_version, "seed": recipe.seed, "key_id": meta.get("key_id"),
        "canary_set_sha256": manifest.canary_set_sha256, "manifest_sha256": manifest.sha256(),
        "references": {"n": recipe.scoring.exposure_references,
                       "drawn": "again by `audit measure`, from spec, seed and audit key, as `audit run` draws them"},
        "dataset": {"jsonl": LAYOUT.train_records, "datasets_dir": LAYOUT.train_dataset, "format": manifest.format,
                    "text_column": c.text_column, "messages_column": c.messages_column,
                    "n_records": manifest.dataset_after.n_records},
        "training": {"max_length": recipe.training.max_length, "packing": recipe.training.packing,
                     "loss": "on every token (the pre-flight checked that every canary copy fits in max_length)"},
    }
    write_json(out_dir / LAYOUT.inject, record)
    save_dataset_dir(out_dir / LAYOUT.train_records, out_dir / LAYOUT.train_dataset)
    return [LAYOUT.recipe, LAYOUT.inject, f"{LAYOUT.train_dataset}/"]


def save_dataset_dir(jsonl: Path, out: Path) -> None:
    """``jsonl`` as a ``datasets`` directory at ``out`` (0700, files 0600), built in a private folder beside it (the
    Arrow cache included, so no copy of the secrets lands in ``~/.cache/huggingface``) and renamed into place."""
    import os
    import shutil
    import tempfile

    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))  # 0700
    try:
        dataset = Dataset.from_json(str(jsonl), cache_dir=str(work / "cache"))
        staged = work / out.name
        dataset.save_to_disk(str(staged))
        del dataset
        for root, dirs, names in os.walk(staged):
            for name in dirs:
                os.chmod(Path(root) / name, 0o700)
            for name in names:
                os.chmod(Path(root) / name, 0o600)
        staged.chmod(0o700)
        os.replace(staged, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _inject_streaming(recipe: Recipe, out_dir: Path, *, model_path: Path, fingerprint: str, progress: bool,
                      key: AuditKey | None) -> InjectStageResult:
    import json
    import os
    import tempfile

    from audit.data.corpus import resolve_format, stream_records
    from audit.data.inject import StreamInjector

    timings: dict[str, float] = {}
    t = time.perf_counter()
    tokenizer = load_tokenizer(model_path, trust_remote_code=recipe.model.trust_remote_code)
    spec = load_spec(recipe.canaries.spec, recipe.canaries.params)
    sampler = None
    if spec_needs_model(spec):
        from audit.data.canaries.sampling import LazyModelSampler

        sampler = LazyModelSampler(model_path, fingerprint=fingerprint, tokenizer=tokenizer)
    canaries = generate_canaries(spec, seed=recipe.seed, tiers=recipe.canaries.tiers,
                                 members_per_tier=recipe.canaries.members_per_tier, references=recipe.canaries.references,
                                 context=GenerationContext(tokenizer=tokenizer, sampler=sampler, progress=progress), key=key,
                                 inclusion=recipe.canaries.inclusion)
    timings["canaries"] = time.perf_counter() - t
    t = time.perf_counter()
    c = recipe.corpus
    records, n = stream_records(c.source, max_records=c.max_records, builtin_n=c.builtin_records, seed=recipe.seed)
    fmt = resolve_format(next(records()), format=c.format, text_column=c.text_column, messages_column=c.messages_column,
                         source=c.source)
    injector = StreamInjector(canaries, n_records=n, seed=recipe.seed, text_column=c.text_column, corpus_source=c.source,
                              format=fmt, messages_column=c.messages_column, mode=c.placement, key=key)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".train.jsonl.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in injector.run(records()):
                f.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
        os.replace(tmp, out_dir / LAYOUT.train_records)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    manifest = injector.manifest()
    timings["inject"] = time.perf_counter() - t
    t = time.perf_counter()
    preflight = run_preflight(manifest, canaries, injector.carriers, tokenizer, **training_options(recipe.training))
    timings["preflight"] = time.perf_counter() - t
    write_jsonl(out_dir / LAYOUT.canaries, canaries.canaries)
    write_json(out_dir / LAYOUT.canaries_meta, canaries_meta(canaries))
    write_json(out_dir / LAYOUT.manifest, manifest)
    write_json(out_dir / LAYOUT.preflight, preflight)
    files = [LAYOUT.train_records, LAYOUT.canaries, LAYOUT.canaries_meta, LAYOUT.manifest, LAYOUT.preflight]
    if canaries.works:
        write_json(out_dir / LAYOUT.works, works_file(canaries))
        files.append(LAYOUT.works)
    require_passed(preflight)
    return InjectStageResult(out_dir=out_dir, files=files, n_records=manifest.dataset_after.n_records,
                             placements=len(manifest.placements), preflight=preflight, timings_s=timings)
