"""Every file of a run directory, named once, with the schema version each persisted file is written at.

A run directory (and the ground-truth directory ``audit inject`` writes, which shares its names) is the product:
resume, ``audit report``, further tunes and MLflow replay all find their files here, so a name lives in one place
(:data:`LAYOUT`) and a version in one table (:data:`SCHEMA_VERSIONS`). Stdlib only: the core, the CLI and the pytest
plugin import it for free.

Versions: a file (or, for JSONL, each row) carries ``schema_version``. A file or row without the field was written
before that file was versioned: it reads as version 0, which has the same fields as version 1 less the version
itself. A version newer than this release knows is refused with one line (:func:`check_version`), never guessed at.
Files with version ``None`` carry none, each for a stated reason (their bytes are fixed by the byte-identity promise,
or they are data or text for people rather than records).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from audit.core.errors import AuditError

SCHEMA_VERSION = 1
"""The version of the records in :mod:`audit.core.schema` (the report, manifest, train summary, canary set, ...): every
file written from them is at this version. Here, beside the table, so the layout needs nothing heavier than itself."""


@dataclass(frozen=True)
class RunLayout:
    """The names of a run directory's files (``run_dir / LAYOUT.report``); one instance, :data:`LAYOUT`."""

    status: str = "run.json"  # running / failed / complete, timings, error, MLflow ids
    lock: str = ".run.lock"  # held while a process works in the directory
    recipe: str = "recipe.yaml"  # the resolved recipe, overrides applied
    canaries: str = "canaries.jsonl"  # the canaries WITH their secrets: never logged to MLflow
    canaries_meta: str = "canaries.meta.json"  # the rest of the canary set (spec, seed, space, works): no secrets
    manifest: str = "manifest.json"  # injection manifest: seed, canary-set hash, dataset fingerprints, placements
    preflight: str = "preflight.json"  # every canary copy fits in max_length and is trained on
    works: str = "works.json"  # with whole works: their provenance
    train_records: str = "train.jsonl"  # the injected training set (secrets included)
    train_dataset: str = "train_dataset"  # train.jsonl again as a saved ``datasets`` folder (secrets included)
    inject: str = "inject.json"  # what ``audit measure`` needs besides canaries and manifest (base, spec, seed, key id)
    corpus: str = "corpus.jsonl"  # the injected corpus :func:`audit.integrations.api.inject_canaries` writes
    external: str = "external.json"  # in an ``audit measure`` run: what was measured; a resume reads it
    train: str = "train.json"  # the training summary, naming the tuned weights (adapter/ or model/)
    scores: str = "scores.jsonl"  # one row per canary and model (ids only)
    works_scan: str = "works_scan.jsonl"  # one row per whole work, model and window (0600)
    works_scan_meta: str = "works_scan.meta.json"  # how works_scan.jsonl was made
    outputs: str = "outputs.jsonl"  # sampled text of the tuned model and its scan (may hold secrets)
    children: str = "children.jsonl"  # one line per further tune of this run (audit.pipeline.chain)
    curves: str = "curves.json"  # training curves while ``audit run`` trains
    token_view: str = "token_view.json"  # per-token probabilities of the most-learned canary (secret tokens masked)
    probe: str = "probe.json"  # ``audit report --probe TEXT``: the per-token view of a chosen text
    report: str = "report.json"  # the audit report: the product
    html: str = "report.html"  # the human report, self-contained
    markdown: str = "report.md"  # the same in Markdown
    pending: str = "tracking_pending.jsonl"  # MLflow calls not sent yet, replayed by ``audit sync`` (no secrets)

    # one file per scored model (label "base", "tuned", ...): stage checkpoints
    def scores_of(self, label: str) -> str:
        return f"scores_{label}.jsonl"

    def calibration_of(self, label: str) -> str:
        return f"calibration_{label}.json"

    def works_scan_of(self, label: str) -> str:
        return f"works_scan_{label}.jsonl"

    release_dir: str = "releases"  # the recipe's releases: releases/merged/ and releases/model.<type>.gguf

    def release_of(self, label: str) -> str:
        """``release_<format>.json`` for the model label ``release:<format>``: the release's file and scores."""
        return f"release_{label.removeprefix('release:')}.json"


LAYOUT = RunLayout()

SCHEMA_VERSIONS: Mapping[str, int | None] = MappingProxyType({
    LAYOUT.status: SCHEMA_VERSION,
    LAYOUT.lock: None,  # a lock, empty
    LAYOUT.recipe: None,  # the recipe as users write it; resume compares its bytes, so it stays as it was written
    LAYOUT.canaries: None,  # bytes fixed (the byte-identity promise); versioned by canaries.meta.json beside it
    LAYOUT.canaries_meta: SCHEMA_VERSION,
    LAYOUT.manifest: SCHEMA_VERSION,
    LAYOUT.preflight: SCHEMA_VERSION,
    LAYOUT.works: SCHEMA_VERSION,
    LAYOUT.train_records: None,  # training data the trainer reads: a field added would be trained on
    LAYOUT.train_dataset: None,  # a datasets folder of the same records
    LAYOUT.inject: SCHEMA_VERSION,
    LAYOUT.corpus: None,  # training data, as train_records
    LAYOUT.external: SCHEMA_VERSION,
    LAYOUT.train: SCHEMA_VERSION,
    LAYOUT.scores: None,  # bytes fixed (the byte-identity promise), as the per-model checkpoints below
    LAYOUT.scores_of("<label>"): None,
    LAYOUT.calibration_of("<label>"): None,  # a CalibrationSummary, read back only by the run that wrote it
    LAYOUT.works_scan: None,  # versioned by works_scan.meta.json beside it
    LAYOUT.works_scan_of("<label>"): None,  # a stage checkpoint, read back only by the run that wrote it
    LAYOUT.works_scan_meta: SCHEMA_VERSION,
    LAYOUT.outputs: 1,
    LAYOUT.children: 1,
    LAYOUT.curves: SCHEMA_VERSION,
    LAYOUT.token_view: SCHEMA_VERSION,
    LAYOUT.probe: 1,
    LAYOUT.report: SCHEMA_VERSION,
    LAYOUT.html: None,  # for people
    LAYOUT.markdown: None,  # for people
    LAYOUT.pending: 1,
    LAYOUT.release_dir: None,  # a folder: the release files themselves (safetensors, GGUF) are the formats' own
    LAYOUT.release_of("<label>"): 1,
})
"""The schema version each file is written at now (None: carries none, for the reason beside it)."""


def entry_of(name: str) -> str:
    """The :data:`SCHEMA_VERSIONS` entry of a file name: itself, or the per-model template it was made from
    (``release_q4_0.json`` -> ``release_<label>.json``)."""
    if name in SCHEMA_VERSIONS:
        return name
    for make in (LAYOUT.scores_of, LAYOUT.calibration_of, LAYOUT.works_scan_of, LAYOUT.release_of):
        before, after = make("<label>").split("<label>")
        if name.startswith(before) and name.endswith(after):
            return make("<label>")
    return name


def versioned(name: str, row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` with the ``schema_version`` that ``name`` is written at now."""
    version = SCHEMA_VERSIONS[entry_of(name)]
    assert version is not None, f"{name} is not a versioned file"
    return {**row, "schema_version": version}


def check_version(path: Path, row: Mapping[str, Any]) -> int:
    """The version of a file (or a JSONL row) of ``path``: 0 when it has none (written before the file was versioned);
    one clear error when a newer canary-audit wrote it."""
    known = SCHEMA_VERSIONS[entry_of(Path(path).name)]
    assert known is not None, f"{path} is not a versioned file"
    found = row.get("schema_version", 0)
    if not isinstance(found, int) or isinstance(found, bool) or found < 0:
        raise AuditError(f"{path} has schema_version {found!r}, which no canary-audit writes",
                         fix=f"the file is damaged: delete {Path(path).name} or start a new run")
    if found > known:
        raise AuditError(f"{path} is schema_version {found}, newer than this canary-audit reads ({known})",
                         fix="upgrade canary-audit (`pip install -U canary-audit`) to read it")
    return found


def read_versioned_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a versioned JSONL file, every one checked by :func:`check_version` (rows of version 0 included)."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
    for row in rows:
        check_version(path, row)
    return rows
