"""Injection: records + canaries -> records with canaries planted + the manifest saying where.

Pure and deterministic. Each member canary is planted ``repetitions`` times; references are never planted.
Placement depends only on the seed, the canary set and the number of records, never on the records' content,
so an in-memory list and a stream of the same records give the same output and the same manifest:

``new_record`` (default)
    each copy becomes its own record, inserted at a seeded gap among the originals: ``{text: canary}`` for text
    corpora, ``[user: <neutral request>, assistant: canary]`` for chat corpora, so the canary is in the assistant
    turn (the part that carries the loss under assistant-only training).
``embed``
    each copy goes into a distinct existing record at a seeded word boundary (for chat records: inside a seeded
    assistant message, or a new assistant message if the record has none), as Meeus et al. 2024 insert traps
    into documents. Realistic, but a long record can push the canary past ``max_length``: the pre-flight checks
    (:mod:`audit.data.preflight`) catch that before training.

Every original record is scanned for canary secrets on the way through; a secret already in the corpus is refused.
The manifest fingerprints the dataset before and after (sha256 of the records' canonical JSON list, computed
incrementally, so streams get the same digest) and lists every placement. The digest after injection is keyed
(HMAC-SHA256 under the audit key) when the canaries are: see :func:`fingerprint_records`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from audit.core.errors import AuditError
from audit.core.rng import SeededStream
from audit.core.schema import MAX_CANARY_COPIES, Canary, CanarySet, DatasetFingerprint, InjectionManifest, Placement
from audit.data.canaries.uniqueness import SecretScanner, check_secrets_absent

if TYPE_CHECKING:
    from audit.core.keys import AuditKey

Format = Literal["text", "messages"]
Mode = Literal["new_record", "embed"]

CHAT_REQUESTS = (
    "Please add this to the notes.",
    "Can you log the following?",
    "What should go in the file today?",
    "Any update for the record?",
    "Write down the latest note.",
    "What is the next entry?",
)
"""Neutral user turns for chat records created by ``new_record``: they never contain the canary."""

_WORD_START = re.compile(r"(?:(?<=\s)|^)\S")


@dataclass(frozen=True)
class InjectionResult:
    records: list[dict[str, Any]]
    manifest: InjectionManifest


def fingerprint_records(records: list[dict[str, Any]], *, key: bytes | None = None) -> DatasetFingerprint:
    """The records' digest: sha256 of their canonical JSON list, or HMAC-SHA256 of it under ``key``.

    Why the dataset after injection is keyed: it is logged (manifest.json, the MLflow dataset digest and tag), the
    corpus before injection is often public (``builtin:notes``, a hub dataset), and the placements say where each
    planted record goes; so a plain digest over the planted records is a check of guessed secrets. With one member
    canary of a 6-digit spec, 10^6 guesses recover it; with more members the guesses multiply, but a spec with
    short secrets or ``members_per_tier: 1`` stays in reach. Keyed, only the key holder can check a guess (or the
    file). The digest before injection holds no canary (the corpus is scanned for secrets) and stays plain sha256,
    so anyone can check it against the corpus they have; so does the digest after when nothing was planted
    (``canaries.inject: false``): it is the corpus.
    """
    fp = RunningFingerprint(key=key)
    for record in records:
        fp.add(record)
    return fp.result()


class RunningFingerprint:
    """The :func:`fingerprint_records` digest computed one record at a time (``sha256_json`` of the list)."""

    def __init__(self, *, key: bytes | None = None) -> None:
        self._h = hashlib.sha256(b"[") if key is None else hmac.new(key, b"[", hashlib.sha256)
        self.n = 0

    def add(self, record: dict[str, Any]) -> None:
        if self.n:
            self._h.update(b",")
        self._h.update(json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
        self.n += 1

    def result(self) -> DatasetFingerprint:
        h = self._h.copy()
        h.update(b"]")
        return DatasetFingerprint(n_records=self.n, sha256=h.hexdigest())


def record_texts(record: dict[str, Any], *, format: Format, text_column: str, messages_column: str) -> list[str]:
    """The strings of a record that training sees (the text column, or every message's content)."""
    if format == "text":
        value = record.get(text_column)
        return [value] if isinstance(value, str) else []
    return [m["content"] for m in record.get(messages_column) or [] if isinstance(m, dict) and isinstance(m.get("content"), str)]


MAX_RECORD_CHARS = 1_000_000
"""The longest record accepted (characters of text the trainer sees). TRL tokenizes every record whole before
truncating it to ``max_length``: one 50 MB record took 8+ minutes and 7 GB to tokenize for a 64-token window. A
record this long is almost always a whole file read as one line; split it into documents."""


def check_record(record: Any, index: int, *, format: Format, text_column: str, messages_column: str, source: str) -> None:
    if not isinstance(record, dict):
        raise AuditError(f"corpus '{source}' record {index} is not a mapping", fix="give records as JSON objects")
    if format == "text":
        if not isinstance(record.get(text_column), str):
            raise AuditError(f"corpus '{source}' record {index}: column '{text_column}' is not text",
                             fix="point corpus.text_column at a string column, or set corpus.format=messages")
        _check_size(len(record[text_column]), index, source)
        return
    messages = record.get(messages_column)
    if isinstance(messages, list) and not messages:
        raise AuditError(f"corpus '{source}' record {index}: '{messages_column}' is an empty conversation",
                         fix="drop empty conversations from the corpus (a chat record needs at least one message)")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise AuditError(f"corpus '{source}' record {index}: '{messages_column}' is not a list of {{role, content}} messages",
                         fix="fix the record, or set corpus.messages_column / corpus.format=text")
    _check_size(sum(len(m["content"]) for m in messages), index, source)


def _check_size(chars: int, index: int, source: str) -> None:
    if chars > MAX_RECORD_CHARS:
        raise AuditError(f"corpus '{source}' record {index} has {chars:,} characters (the limit is {MAX_RECORD_CHARS:,}); "
                         "the trainer would tokenize all of it to keep the first max_length tokens",
                         fix="split long documents into records, or drop that record")


def _embed(text: str, canary_text: str, rng: SeededStream) -> tuple[str, int]:
    """Insert ``canary_text`` at a seeded word boundary of ``text``; return the new text and the canary's offset."""
    starts = [m.start() for m in _WORD_START.finditer(text)] + [len(text)]
    at = rng.choice(starts)
    if at == len(text):
        glue = "" if not text or text[-1].isspace() else " "
        return text + glue + canary_text, len(text) + len(glue)
    return text[:at] + canary_text + " " + text[at:], at


class StreamInjector:
    """Plants canaries into a stream of ``n_records`` records; :meth:`manifest` is complete once the stream is drained.

    Records that carry a canary are kept in :attr:`carriers` (output index -> record) for the pre-flight checks.
    """

    def __init__(self, canaries: CanarySet, *, n_records: int, seed: int, text_column: str = "text",
                 corpus_source: str = "", format: Format = "text", messages_column: str = "messages",
                 mode: Mode = "new_record", key: AuditKey | None = None) -> None:
        if (None if key is None else key.id) != canaries.key_id:
            raise ValueError(f"canaries drawn under key {canaries.key_id} are injected with key "
                             f"{None if key is None else key.id}: the dataset digest must be keyed like them")
        self.canaries = canaries
        self.n_records = n_records
        self.seed = seed
        self.text_column = text_column
        self.corpus_source = corpus_source
        self.format = format
        self.messages_column = messages_column
        self.mode = mode
        self.empty_records = 0
        """Records with no text to train on (counted as they stream by; a corpus of only these is refused)."""
        self.carriers: dict[int, dict[str, Any]] = {}
        copies = sum(c.repetitions for c in canaries.members())
        if copies > MAX_CANARY_COPIES:
            raise AuditError(f"canaries.tiers would plant {copies:,} canary copies (the limit is {MAX_CANARY_COPIES:,}): "
                             f"tiers {sorted({c.repetitions for c in canaries.members()})} x members per tier",
                             fix="use smaller tiers (1-64 copies are the usual range) or fewer canaries.members_per_tier")
        self._copies: list[tuple[Canary, int]] = [(c, k) for c in canaries.members() for k in range(c.repetitions)]
        self._key = f"inject:{canaries.sha256()}"
        rng = SeededStream(seed, self._key)
        if mode == "new_record":
            # Each copy picks a gap among the original records (0 = before the first); ties keep copy order.
            self._slots = sorted((rng.below(n_records + 1), i) for i in range(len(self._copies)))
        elif mode == "embed":
            if len(self._copies) > n_records:
                raise AuditError(f"embed placement needs one distinct record per canary copy: {len(self._copies)} copies "
                                 f"but only {n_records} records", fix="use corpus.placement=new_record or a larger corpus")
            hosts = rng.shuffled(range(n_records))[: len(self._copies)]
            self._hosts = {h: i for i, h in enumerate(hosts)}
        else:
            raise AuditError(f"unknown placement mode '{mode}'", fix="use new_record or embed")
        self._placements: list[Placement] = []
        self._before = RunningFingerprint()
        # the planted records: keyed (see fingerprint_records); with nothing planted it is the corpus, plain like before
        self._after = RunningFingerprint(key=None if key is None or not self._copies else key.secret)
        self._scanner = SecretScanner({c.id: c.secret for c in canaries.canaries})
        self._done = False

    # ------------------------------------------------------------------ records created or changed
    def _new_record(self, blank: dict[str, Any], copy_index: int) -> tuple[dict[str, Any], Placement]:
        canary, k = self._copies[copy_index]
        if self.format == "text":
            record = {**blank, self.text_column: canary.text}
            return record, Placement(canary_id=canary.id, copy_index=k, record_index=-1, offset=0, column=self.text_column)
        request = CHAT_REQUESTS[SeededStream(self.seed, f"{self._key}:request:{copy_index}").below(len(CHAT_REQUESTS))]
        messages = [{"role": "user", "content": request}, {"role": "assistant", "content": canary.text}]
        return ({**blank, self.messages_column: messages},
                Placement(canary_id=canary.id, copy_index=k, record_index=-1, offset=0, column=self.messages_column,
                          message_index=1))

    def _embed_record(self, record: dict[str, Any], copy_index: int) -> tuple[dict[str, Any], Placement]:
        canary, k = self._copies[copy_index]
        rng = SeededStream(self.seed, f"{self._key}:embed:{copy_index}")
        if self.format == "text":
            text, offset = _embed(record[self.text_column], canary.text, rng)
            return ({**record, self.text_column: text},
                    Placement(canary_id=canary.id, copy_index=k, record_index=-1, offset=offset, column=self.text_column))
        messages = [dict(m) for m in record[self.messages_column]]
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if assistant:
            at = rng.choice(assistant)
            messages[at]["content"], offset = _embed(messages[at]["content"], canary.text, rng)
        else:  # no assistant turn to carry it: add one, so the canary is still in an assistant turn
            at, offset = len(messages), 0
            messages.append({"role": "assistant", "content": canary.text})
        return ({**record, self.messages_column: messages},
                Placement(canary_id=canary.id, copy_index=k, record_index=-1, offset=offset, column=self.messages_column,
                          message_index=at))

    # ------------------------------------------------------------------ the stream
    def run(self, records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        out_index = 0

        def emit(record: dict[str, Any], placement: Placement | None = None) -> dict[str, Any]:
            nonlocal out_index
            if placement is not None:
                self._placements.append(placement.model_copy(update={"record_index": out_index}))
                self.carriers[out_index] = record
            self._after.add(record)
            out_index += 1
            return record

        slots = iter(self._slots) if self.mode == "new_record" else iter(())
        next_slot = next(slots, None)
        blank: dict[str, Any] | None = None
        gap = 0
        for gap, record in enumerate(records):
            if gap >= self.n_records:
                raise AuditError(f"corpus '{self.corpus_source}' has more records than the {self.n_records} announced",
                                 fix="count the records again (the corpus changed while reading?)")
            check_record(record, gap, format=self.format, text_column=self.text_column,
                          messages_column=self.messages_column, source=self.corpus_source)
            check_secrets_absent(self._scanner, gap, record_texts(record, format=self.format, text_column=self.text_column,
                                                                  messages_column=self.messages_column),
                                 source=self.corpus_source)
            self._before.add(record)
            if not any(t.strip() for t in record_texts(record, format=self.format, text_column=self.text_column,
                                                        messages_column=self.messages_column)):
                self.empty_records += 1
            if blank is None:
                blank = {key: None for key in record}
            while next_slot is not None and next_slot[0] == gap:
                yield emit(*self._new_record(blank, next_slot[1]))
                next_slot = next(slots, None)
            if self.mode == "embed" and gap in self._hosts:
                yield emit(*self._embed_record(record, self._hosts[gap]))
            else:
                yield emit(record)
        seen = self._before.n
        if seen and self.empty_records == seen:
            raise AuditError(f"corpus '{self.corpus_source}': all {seen} records are empty",
                             fix="check corpus.text_column / corpus.messages_column (is it the column that holds the text?)")
        if seen != self.n_records:
            raise AuditError(f"corpus '{self.corpus_source}' yielded {seen} records, {self.n_records} were announced",
                             fix="count the records again (the corpus changed while reading?)")
        while next_slot is not None:  # copies placed after the last record
            yield emit(*self._new_record(blank or {}, next_slot[1]))
            next_slot = next(slots, None)
        self._done = True

    def manifest(self) -> InjectionManifest:
        if not self._done:
            raise RuntimeError("the manifest is complete only after the stream is drained")
        return InjectionManifest(
            key_id=self.canaries.key_id,
            seed=self.seed,
            spec=self.canaries.spec,
            spec_version=self.canaries.spec_version,
            canary_set_sha256=self.canaries.sha256(),
            text_column=self.text_column if self.format == "text" else self.messages_column,
            corpus_source=self.corpus_source,
            dataset_before=self._before.result(),
            dataset_after=self._after.result(),
            placements=sorted(self._placements, key=lambda p: (p.canary_id, p.copy_index)),
            format=self.format,
            placement_mode=self.mode,
            works=self.canaries.works,
            excerpts=self.canaries.excerpts,
        )


def inject(
    records: list[dict[str, Any]],
    canaries: CanarySet,
    *,
    seed: int,
    text_column: str = "text",
    corpus_source: str = "",
    format: Format = "text",
    messages_column: str = "messages",
    mode: Mode = "new_record",
    key: AuditKey | None = None,
) -> InjectionResult:
    """Plant every member canary ``repetitions`` times (see the module docstring for the two modes).

    ``key``: the audit key the canaries were drawn under, for the digest of the dataset after injection
    (:func:`fingerprint_records`)."""
    injector = StreamInjector(canaries, n_records=len(records), seed=seed, text_column=text_column, corpus_source=corpus_source,
                              format=format, messages_column=messages_column, mode=mode, key=key)
    out = list(injector.run(records))
    return InjectionResult(records=out, manifest=injector.manifest())
