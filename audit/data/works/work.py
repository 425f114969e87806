"""A work: its text and its provenance."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from audit.core.schema import WorkProvenance


@dataclass(frozen=True)
class Work:
    provenance: WorkProvenance
    text: str

    @property
    def id(self) -> str:
        return self.provenance.id


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def make_work(text: str, **provenance) -> Work:
    """A :class:`Work` whose id and sha256 are computed from ``text`` (the text as planted, after cleaning)."""
    digest = sha256_text(text)
    return Work(provenance=WorkProvenance(id=digest[:16], sha256=digest, n_chars=len(text), **provenance), text=text)
