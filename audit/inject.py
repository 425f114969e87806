"""Injection: records + canaries -> records with canaries planted + the manifest saying where.

Pure and deterministic: each member canary contributes ``repetitions`` standalone records, inserted at seeded
positions among the original records; references are never inserted. The manifest fingerprints the dataset
before and after and lists every placement, so an auditor can check that each copy reached the training set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from audit.rng import SeededStream
from audit.schema import CanarySet, DatasetFingerprint, InjectionManifest, Placement, sha256_json


@dataclass(frozen=True)
class InjectionResult:
    records: list[dict[str, Any]]
    manifest: InjectionManifest


def fingerprint_records(records: list[dict[str, Any]]) -> DatasetFingerprint:
    return DatasetFingerprint(n_records=len(records), sha256=sha256_json(records))


def inject(
    records: list[dict[str, Any]],
    canaries: CanarySet,
    *,
    seed: int,
    text_column: str = "text",
    corpus_source: str = "",
) -> InjectionResult:
    """Plant every member canary ``repetitions`` times as its own record, at seeded positions."""
    copies = [(c, k) for c in canaries.members() for k in range(c.repetitions)]
    rng = SeededStream(seed, f"inject:{canaries.sha256()}")
    # Each copy picks a gap among the original records (0 = before the first); ties keep copy order.
    slots = sorted(((rng.below(len(records) + 1), i) for i in range(len(copies))))
    blank = {key: None for key in records[0]} if records else {}
    out: list[dict[str, Any]] = []
    placements: list[Placement] = []
    slot_iter = iter(slots)
    next_slot = next(slot_iter, None)
    for gap in range(len(records) + 1):
        while next_slot is not None and next_slot[0] == gap:
            canary, copy_index = copies[next_slot[1]]
            placements.append(Placement(canary_id=canary.id, copy_index=copy_index, record_index=len(out), offset=0))
            out.append({**blank, text_column: canary.text})
            next_slot = next(slot_iter, None)
        if gap < len(records):
            out.append(records[gap])
    placements.sort(key=lambda p: (p.canary_id, p.copy_index))
    manifest = InjectionManifest(
        seed=seed,
        spec=canaries.spec,
        canary_set_sha256=canaries.sha256(),
        text_column=text_column,
        corpus_source=corpus_source,
        dataset_before=fingerprint_records(records),
        dataset_after=fingerprint_records(out),
        placements=placements,
    )
    return InjectionResult(records=out, manifest=manifest)
