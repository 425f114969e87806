"""Uniqueness of canaries: no duplicates, no near duplicates, no secret already in the fine-tuning corpus.

Near duplicates are measured as the Jaccard similarity of character n-gram sets of two secrets,
``|A & B| / |A | B|`` (MIMIR builds non-members with an n-gram overlap threshold; Meeus et al. 2024 deduplicate
traps by Jaccard <= 0.2 of token sets). A secret that is a near copy of another canary's would let a member
lend its memorization to a reference and blur the member / non-member contrast.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from audit.core.errors import AuditError

DEFAULT_NGRAM = 4
DEFAULT_MAX_JACCARD = 0.5


def char_ngrams(text: str, n: int) -> frozenset[str]:
    text = " ".join(text.split())
    if len(text) <= n:
        return frozenset([text])
    return frozenset(text[i : i + n] for i in range(len(text) - n + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


@dataclass
class UniquePool:
    """Accepts secrets one at a time, refusing exact and near duplicates of earlier ones (and of ``exclude``)."""

    ngram: int = DEFAULT_NGRAM
    max_jaccard: float = DEFAULT_MAX_JACCARD
    exclude: Iterable[str] = ()
    accepted: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._grams: list[frozenset[str]] = [char_ngrams(s, self.ngram) for s in self.exclude]
        self._seen: set[str] = set(self.exclude)

    def offer(self, secret: str) -> bool:
        if not secret or secret in self._seen:
            return False
        grams = char_ngrams(secret, self.ngram)
        if any(jaccard(grams, other) > self.max_jaccard for other in self._grams):
            return False
        self._seen.add(secret)
        self._grams.append(grams)
        self.accepted.append(secret)
        return True


def near_duplicate_pairs(secrets: list[str], *, ngram: int = DEFAULT_NGRAM,
                         max_jaccard: float = DEFAULT_MAX_JACCARD) -> list[tuple[int, int, float]]:
    """All index pairs ``(i, j, similarity)`` whose secrets are identical or more similar than ``max_jaccard``."""
    grams = [char_ngrams(s, ngram) for s in secrets]
    out = []
    for i in range(len(secrets)):
        for j in range(i + 1, len(secrets)):
            sim = 1.0 if secrets[i] == secrets[j] else jaccard(grams[i], grams[j])
            if sim > max_jaccard:
                out.append((i, j, round(sim, 4)))
    return out


class SecretScanner:
    """Finds canary secrets inside corpus text with one compiled alternation (one pass per record)."""

    def __init__(self, secrets_by_id: dict[str, str]) -> None:
        self._by_secret = {s: cid for cid, s in secrets_by_id.items() if s}
        ordered = sorted(self._by_secret, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(s) for s in ordered)) if ordered else None

    def find(self, text: str) -> str | None:
        """The id of a canary whose secret occurs in ``text``, or None."""
        if self._pattern is None or not text:
            return None
        match = self._pattern.search(text)
        return self._by_secret[match.group(0)] if match else None


def check_secrets_absent(scanner: SecretScanner, record_index: int, texts: Iterable[str], *, source: str) -> None:
    """Raise if any canary secret already occurs in the corpus record (the audit could not tell learning from copying)."""
    for text in texts:
        found = scanner.find(text)
        if found is not None:
            raise AuditError(
                f"the secret of canary {found} already occurs in corpus '{source}' record {record_index}: "
                "its exposure would measure the corpus, not the planted copies",
                fix="change the seed (or the spec) so a fresh secret is drawn",
            )


def raise_on_near_duplicates(secrets: list[str], ids: list[str], *, ngram: int, max_jaccard: float, spec: str) -> None:
    pairs = near_duplicate_pairs(secrets, ngram=ngram, max_jaccard=max_jaccard)
    if pairs:
        i, j, sim = pairs[0]
        raise AuditError(f"canary spec '{spec}': canaries {ids[i]} and {ids[j]} are near duplicates "
                         f"({ngram}-gram Jaccard {sim} > {max_jaccard}); {len(pairs)} such pair(s)",
                         fix="add variety to the spec (longer secrets, more words) or raise params.max_jaccard")
