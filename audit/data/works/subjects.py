"""Whole works as audit subjects: which works, which role, which chunks, and where each copy is planted.

    works:                          # a recipe section (audit.core.schema.WorksSection); off unless a recipe has it
      sources: [synthetic, shakespeare, "folder:my_books", corpus]
      per_source: 4                 # 2 members + 2 held out per source, by the keyed draw
      copies: 4                     # each member chunk planted 4 times
      prefix_tokens: 50             # the window scan (audit.score.works_scan): 50 + 50 tokens every 50
      suffix_tokens: 50
      stride: 50

Per source the works are shuffled by a stream keyed with the audit key (so nobody can tell members from held-out
works without it, as for canaries) and the first ``per_source`` that hold at least one window are taken; the first
``per_source // 2`` of those are **members**, the others **held out** (the control: same source, never planted).
A work is audited on its first ``max_tokens`` tokens. A member is cut into consecutive chunks that each fit
``training.max_length`` (as the trainer tokenizes them: EOS appended), and every chunk is planted ``copies`` times as
its own record at a seeded gap of the training set (after the canaries, whose placements move with the records).
A window that straddles two chunks was never trained as one sequence: keep ``max_length`` well above a window.

``corpus`` audits records of the fine-tuning set itself (the training-data extraction audit): eligible records
(text format, no canary in them, at least one window long, and within ``max_length``) are drawn; a member stays
where it is (plus ``copies - 1`` duplicates), a held-out record is taken out of the training set.

Everything is recorded in ``manifest.json``: ``subject_works`` (provenance), ``work_subjects`` (role, copies, the
audited text's sha256 and length, its chunks) and ``work_placements`` (record of every copy). No text; and for secret
works (``synthetic``, ``corpus``) no plain hash either: their ids and digests are keyed (:func:`_named`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from audit.core.errors import AuditError
from audit.core.rng import SeededStream
from audit.core.schema import (
    Canary,
    CanarySet,
    InjectionManifest,
    Placement,
    PreflightReport,
    Recipe,
    SecretSpace,
    WorkChunk,
    WorkPlacement,
    WorkProvenance,
    WorksSection,
    WorkSubject,
)
from audit.data.works.work import Work, make_work, sha256_text
from audit.metrics.disclosure import SECRET_WORK_KINDS

if TYPE_CHECKING:
    from audit.core.keys import AuditKey
    from audit.data.inject import InjectionResult

@dataclass(frozen=True)
class WorksPlan:
    """The audited works of one run: what the manifest records, plus the texts (kept in memory, never written)."""

    section: WorksSection
    subjects: list[WorkSubject]
    provenance: list[WorkProvenance]
    texts: dict[str, str] = field(repr=False)
    """Work id -> the audited text (the work's first ``n_tokens`` tokens)."""

    def by_id(self) -> dict[str, WorkSubject]:
        return {s.work_id: s for s in self.subjects}

    def scan_inputs(self, tokenizer: Any) -> list[tuple[str, list[int]]]:
        """``(work_id, token ids)`` of every audited work, as the window scan reads them."""
        return [(s.work_id, token_ids(self.texts[s.work_id], tokenizer)) for s in self.subjects]


def token_ids(text: str, tokenizer: Any) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _offsets(text: str, tokenizer: Any) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]


def cut_to_tokens(text: str, tokenizer: Any, max_tokens: int) -> str:
    """``text`` up to the end of its ``max_tokens``-th token (tokenizing only as much of it as that needs)."""
    window = max(256, max_tokens * 8)
    while True:
        head = text[:window]
        offsets = _offsets(head, tokenizer)
        if window >= len(text):
            return text if len(offsets) <= max_tokens else text[: offsets[max_tokens - 1][1]]
        if len(offsets) > max_tokens:  # one more than asked: the window's last token may be cut
            return text[: offsets[max_tokens - 1][1]]
        window *= 2


def chunk_text(text: str, tokenizer: Any, *, max_length: int) -> list[WorkChunk]:
    """Consecutive pieces of ``text`` (together exactly ``text``), each at most ``max_length`` tokens as the trainer
    tokenizes a record (special tokens, EOS appended): cut at token starts, shortened where a piece re-tokenizes
    longer than planned."""
    from audit.data.preflight import record_tokens

    offsets = _offsets(text, tokenizer)
    starts = [a for a, _ in offsets]
    cut = [0] + starts[1:] + [len(text)]  # cut[i]: where token i starts (cut[n] = the end)
    n = len(offsets)
    chunks, a = [], 0
    while a < n:
        b = min(n, a + max_length)
        while True:
            piece = text[cut[a] : cut[b]]
            over = record_tokens(piece, tokenizer) - max_length
            if over <= 0:
                break
            if b - a <= over:
                raise AuditError(f"one token of a work needs more than training.max_length {max_length} tokens",
                                 fix="raise training.max_length")
            b -= over
        chunks.append(WorkChunk(start=cut[a], end=cut[b], n_tokens=b - a))
        a = b
    return chunks


# --------------------------------------------------------------------------------------------------- candidates


def _source_works(source: str, section: WorksSection, *, sampler: Any, seed: int, key: AuditKey | None,
                  corpus: Any, exclude_records: set[int], text_column: str, progress: bool) -> list[tuple[Work, int | None]]:
    """``(work, corpus record index or None)`` of one source, before the keyed draw."""
    from pathlib import Path

    from audit.core.errors import did_you_mean
    from audit.core.schema import WORKS_SUBJECT_SOURCES
    from audit.data.works.sources import load_source

    if source not in WORKS_SUBJECT_SOURCES and not source.startswith("folder:") and not Path(source).expanduser().is_dir():
        raise AuditError(f"unknown works source '{source}'." + did_you_mean(source, WORKS_SUBJECT_SOURCES),
                         fix=f"use one of: {', '.join(WORKS_SUBJECT_SOURCES)}")
    if source == "corpus":
        if corpus.format != "text":
            raise AuditError("works source 'corpus' reads text records; this corpus is chat messages",
                             fix="drop 'corpus' from works.sources, or audit a text corpus")
        return [(make_work(r[text_column], title=f"corpus record {i}", kind="corpus", license="private (training data)",
                           source=f"corpus:{corpus.source}", path=f"record {i}"), i)
                for i, r in enumerate(corpus.records) if i not in exclude_records and isinstance(r.get(text_column), str)
                and r[text_column].strip()]
    synthetic = {"works": section.per_source, "tokens": section.synthetic.tokens,
                 "temperature": section.synthetic.temperature, "prompt": section.synthetic.prompt}
    # keyed: without the audit key nobody regenerates the synthetic works from the logged seed and the base model
    draw_seed = SeededStream(seed, "works_subjects:synthetic", key=None if key is None else key.secret).below(2**31)
    return [(w, None) for w in load_source(source, sampler=sampler, synthetic=synthetic, seed=draw_seed, progress=progress)]


def _check_window(section: WorksSection, max_length: int) -> None:
    width = section.prefix_tokens + section.suffix_tokens
    if width > max_length:
        raise AuditError(f"works: a window of {section.prefix_tokens} + {section.suffix_tokens} = {width} tokens is longer "
                         f"than training.max_length {max_length}: no trained sequence holds a whole window",
                         fix="lower works.prefix_tokens / works.suffix_tokens or raise training.max_length")


def plan_works(recipe: Recipe, *, tokenizer: Any, sampler: Any, seed: int, key: AuditKey | None, corpus: Any,
               carriers: set[int], progress: bool = False) -> WorksPlan:
    """Draw the audited works of ``recipe.works`` (see the module docstring); nothing is planted yet.

    ``corpus``: the :class:`audit.data.corpus.Corpus` before injection; ``carriers``: indices of its records that now carry
    a canary (never drawn as ``corpus`` works)."""
    from audit.data.preflight import record_tokens

    section = recipe.works
    assert section is not None
    max_length = recipe.training.max_length
    _check_window(section, max_length)
    width = section.prefix_tokens + section.suffix_tokens
    key_bytes = None if key is None else key.secret
    subjects: list[WorkSubject] = []
    provenance: list[WorkProvenance] = []
    texts: dict[str, str] = {}
    for source in section.sources:
        candidates = _source_works(source, section, sampler=sampler, seed=seed, key=key, corpus=corpus,
                                   exclude_records=carriers, text_column=recipe.corpus.text_column, progress=progress)
        user_named = source.startswith("folder:") or source == "synthetic"  # each of these works was asked for
        chosen: list[tuple[Work, str, int | None]] = []
        for work, record in SeededStream(seed, f"works_subjects:draw:{source}", key=key_bytes).shuffled(candidates):
            if len(chosen) == section.per_source:
                break
            text = cut_to_tokens(work.text, tokenizer, section.max_tokens)
            n = len(token_ids(text, tokenizer))
            if n < width:
                if user_named:
                    raise AuditError(f"works: '{work.provenance.title}' ({source}) has {n} tokens, shorter than one window "
                                     f"of {width}", fix="remove it, or lower works.prefix_tokens / works.suffix_tokens")
                continue
            if record is not None and record_tokens(text, tokenizer) > max_length:
                continue  # a corpus record the trainer would truncate is not audited whole
            chosen.append((work, text, record))
        if len(chosen) < 2:
            raise AuditError(f"works source '{source}' gave {len(chosen)} work(s) of at least one window ({width} tokens); "
                             "a source needs a member and a held-out work",
                             fix="add works to the source, lower works.prefix_tokens / suffix_tokens, or drop the source")
        members = len(chosen) // 2
        for i, (work, text, record) in enumerate(chosen):
            work, digest = _named(work, text, key)
            if work.id in texts:
                raise AuditError(f"works: '{work.provenance.title}' ({work.id}) is drawn twice (sources overlap)",
                                 fix="list each work in one source only")
            role = "member" if i < members else "held_out"
            chunks = [] if role == "held_out" or record is not None else chunk_text(text, tokenizer, max_length=max_length)
            subjects.append(WorkSubject(work_id=work.id, source=source, kind=work.provenance.kind, role=role,
                                        copies=section.copies if role == "member" else 0, n_chars=len(text),
                                        n_tokens=len(token_ids(text, tokenizer)), sha256=digest, chunks=chunks,
                                        corpus_record=record))
            provenance.append(work.provenance)
            texts[work.id] = text
    return WorksPlan(section=section, subjects=subjects, provenance=provenance, texts=texts)


def _named(work: Work, text: str, key: AuditKey | None) -> tuple[Work, str]:
    """The work with the id it is audited under, and the digest of its audited text.

    A plain hash of a secret text (a ``synthetic`` work, a ``corpus`` record) checks a guessed text: anyone could hash
    candidate records and compare. Their id and digests are HMAC-SHA256 under the audit key instead, which only the key
    holder can recompute (as the dataset digest after injection is keyed, :func:`audit.data.inject.fingerprint_records`)."""
    if key is None or work.provenance.kind not in SECRET_WORK_KINDS:
        return work, sha256_text(text)
    whole = key.digest("works_subject", work.text)
    provenance = work.provenance.model_copy(update={"id": whole[:16], "sha256": whole, "archive_sha256": None})
    return Work(provenance=provenance, text=work.text), key.digest("works_subject", text)


# --------------------------------------------------------------------------------------------------- planting


def plant_works(injection: InjectionResult, plan: WorksPlan, *, canaries: CanarySet, seed: int, key: AuditKey | None,
                text_column: str) -> InjectionResult:
    """The training set with the member works planted and the held-out ``corpus`` records taken out; canary placements
    move with their records, the digest after injection is recomputed (keyed), and the manifest records it all."""
    from audit.data.canaries.uniqueness import SecretScanner, check_secrets_absent
    from audit.data.inject import InjectionResult, fingerprint_records

    manifest = injection.manifest
    records = injection.records
    scanner = SecretScanner({c.id: c.secret for c in canaries.canaries})
    for s in plan.subjects:  # a work that holds a canary secret would plant it again
        check_secrets_absent(scanner, -1, [plan.texts[s.work_id]], source=f"works:{s.source} '{s.work_id}'")
    injected_index = _injected_index(manifest, len(records))
    removed = {injected_index[s.corpus_record] for s in plan.subjects if s.role == "held_out" and s.corpus_record is not None}
    kept_in_place = {injected_index[s.corpus_record]: s.work_id for s in plan.subjects
                     if s.role == "member" and s.corpus_record is not None}
    copies: list[tuple[str, int, int, str]] = []  # (work id, chunk, copy, text)
    for s in plan.subjects:
        if s.role != "member":
            continue
        text = plan.texts[s.work_id]
        if s.corpus_record is not None:
            copies += [(s.work_id, -1, k, text) for k in range(1, s.copies)]
        else:
            copies += [(s.work_id, c, k, text[ch.start : ch.end]) for c, ch in enumerate(s.chunks) for k in range(s.copies)]
    kept = [i for i in range(len(records)) if i not in removed]
    rng = SeededStream(seed, f"works_subjects:inject:{manifest.canary_set_sha256}")
    slots = sorted((rng.below(len(kept) + 1), j) for j in range(len(copies)))  # gap 0 = before the first kept record
    blank = {k: None for k in records[0]} if records else {}
    out: list[dict[str, Any]] = []
    moved: dict[int, int] = {}
    placements: list[WorkPlacement] = []
    si = 0
    for gap in range(len(kept) + 1):
        while si < len(slots) and slots[si][0] == gap:
            work_id, chunk, k, text = copies[slots[si][1]]
            placements.append(WorkPlacement(work_id=work_id, chunk=chunk, copy_index=k, record_index=len(out)))
            out.append({**blank, text_column: text})
            si += 1
        if gap < len(kept):
            i = kept[gap]
            moved[i] = len(out)
            if i in kept_in_place:
                placements.append(WorkPlacement(work_id=kept_in_place[i], chunk=-1, copy_index=0, record_index=len(out)))
            out.append(records[i])
    secret = None if key is None else key.secret
    updated = manifest.model_copy(update={
        "placements": [p.model_copy(update={"record_index": moved[p.record_index]}) for p in manifest.placements],
        "dataset_after": fingerprint_records(out, key=secret),
        "subject_works": plan.provenance, "work_subjects": plan.subjects,
        "work_placements": sorted(placements, key=lambda p: (p.work_id, p.chunk, p.copy_index)),
    })
    return InjectionResult(records=out, manifest=updated)


def _injected_index(manifest: InjectionManifest, n_injected: int) -> dict[int, int]:
    """Corpus record index -> its index in the injected records (``new_record`` inserts canary records before some)."""
    new = sorted(p.record_index for p in manifest.placements) if manifest.placement_mode == "new_record" else []
    new_set = set(new)
    out, original = {}, 0
    for i in range(n_injected):
        if i in new_set:
            continue
        out[original] = i
        original += 1
    return out


def canary_carriers(manifest: InjectionManifest) -> set[int]:
    """Corpus record indices that carry a canary: ``embed`` placements (``new_record`` carries them in new records,
    and ``embed`` adds no record, so its placement's index is the corpus index)."""
    return set() if manifest.placement_mode == "new_record" else {p.record_index for p in manifest.placements}


# --------------------------------------------------------------------------------------------------- pre-flight


def works_preflight(injection: InjectionResult, plan: WorksPlan, tokenizer: Any, *, seed: int,
                    options: dict[str, Any]) -> PreflightReport:
    """The canary pre-flight (:func:`audit.data.preflight.run_preflight`) over every planted work copy: each chunk (and each
    ``corpus`` member record) as a canary with an empty prefix, found at offset 0 of the record the manifest names."""
    from audit.data.preflight import run_preflight

    manifest = injection.manifest
    rows, placements = {}, []
    subjects = plan.by_id()
    for p in manifest.work_placements:
        s = subjects[p.work_id]
        text = plan.texts[s.work_id]
        if p.chunk >= 0:
            text = text[s.chunks[p.chunk].start : s.chunks[p.chunk].end]
        cid = f"work:{p.work_id}#{p.chunk}"
        rows[cid] = Canary(id=cid, spec="works", prefix="", secret=text, repetitions=max(1, s.copies))
        placements.append(Placement(canary_id=cid, copy_index=p.copy_index, record_index=p.record_index, offset=0,
                                    column=manifest.text_column))
    pseudo = CanarySet(spec="works", spec_version=1, seed=seed, space=SecretSpace(kind="sampled", bits=1.0),
                       canaries=list(rows.values()))
    return run_preflight(manifest.model_copy(update={"placements": placements}), pseudo, injection.records, tokenizer, **options)


def merge_preflight(a: PreflightReport, b: PreflightReport) -> PreflightReport:
    """One report over the canary copies and the work copies."""
    needed = [x for x in (a.max_length_needed, b.max_length_needed) if x]
    return a.model_copy(update={
        "placements_checked": a.placements_checked + b.placements_checked,
        "canary_tokens_max": max(a.canary_tokens_max, b.canary_tokens_max),
        "record_tokens_max": max(a.record_tokens_max, b.record_tokens_max),
        "findings": [*a.findings, *b.findings], "max_length_needed": max(needed) if needed else None})
