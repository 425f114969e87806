"""Fine-tuning corpora: a built-in generated one, or a Hugging Face ``datasets`` source.

The built-in ``notes`` corpus is short office and maintenance notes made from templates with a seeded stream:
it needs no download, has no license question (the project's own text, CC0) and looks enough like a small
SFT set for canaries to be learned the way they would be in real data. ``chat`` is the same notes as
user/assistant exchanges (``messages`` records), for chat-format audits.

Sources: ``builtin:<name>``, a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file, a directory written by
``datasets.save_to_disk``, or a hub id. Records are either ``text`` (a string column) or ``messages`` (a list of
``{role, content}``); ``format: auto`` picks from the first record. :func:`stream_records` reads any of them
without holding the corpus in memory (for ``audit inject --stream``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from audit.core.errors import AuditError, did_you_mean
from audit.core.rng import SeededStream

_PEOPLE = ["Alex", "Blake", "Casey", "Devon", "Emery", "Finley", "Harper", "Jordan", "Kai", "Logan", "Morgan",
           "Parker", "Quinn", "Reese", "Riley", "Rowan", "Sage", "Skyler", "Taylor", "Toby"]
_THINGS = ["printer", "projector", "coffee machine", "badge reader", "thermostat", "router", "elevator",
           "fire door", "whiteboard", "laptop dock", "fridge", "server rack", "desk lamp", "scanner"]
_PLACES = ["the third floor", "meeting room B", "the lobby", "the east wing", "the kitchen", "the archive",
           "the loading bay", "the library", "reception", "the north stairwell"]
_STATES = ["is broken again", "was repaired this morning", "needs a new filter", "makes a strange noise",
           "was moved", "is out of paper", "keeps restarting", "is booked all week", "works fine now",
           "has a loose cable"]
_ACTIONS = ["Please tell facilities.", "No action needed.", "Ticket filed with support.", "Will check tomorrow.",
            "Ask the front desk for the key.", "Parts are on order.", "Thanks to everyone who helped.",
            "Use the one downstairs meanwhile."]
_TEMPLATES = [
    "{p} reports that the {t} in {l} {s}. {a}",
    "Reminder from {p}: the {t} in {l} {s}. {a}",
    "Update: the {t} near {l} {s}, according to {p}. {a}",
    "{p} wrote: the {t} in {l} {s}. {a}",
    "Maintenance log: {t}, {l}. Status: {s}. Reported by {p}.",
    "Weekly note: {p} says the {t} in {l} {s}. {a}",
]

BUILTIN_CORPORA = ("notes", "chat")
_QUESTIONS = ["Any news about the {t}?", "What is going on with the {t}?", "Is the {t} in {l} working?",
              "Can you give me the latest note?", "What did {p} report?", "Anything new from {l}?"]


def builtin_records(name: str, *, n: int, seed: int) -> list[dict[str, Any]]:
    """Generate ``n`` records of the built-in corpus ``name``: ``{"text": ...}`` or ``{"messages": [...]}``."""
    if name not in BUILTIN_CORPORA:
        raise AuditError(f"unknown built-in corpus '{name}'." + did_you_mean(name, BUILTIN_CORPORA),
                         fix=f"use one of: {', '.join('builtin:' + c for c in BUILTIN_CORPORA)}")
    rng = SeededStream(seed, "corpus:notes")
    questions = SeededStream(seed, "corpus:chat:questions")
    records = []
    for _ in range(n):
        template = rng.choice(_TEMPLATES)  # draw order kept: the tiny-llama tokenizer is trained on this corpus
        p, t, place = rng.choice(_PEOPLE), rng.choice(_THINGS), rng.choice(_PLACES)
        text = template.format(p=p, t=t, l=place, s=rng.choice(_STATES), a=rng.choice(_ACTIONS))
        if name == "notes":
            records.append({"text": text})
        else:
            question = questions.choice(_QUESTIONS).format(p=p, t=t, l=place)
            records.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": text}]})
    return records


CorpusFormat = Literal["text", "messages"]


@dataclass(frozen=True)
class Corpus:
    source: str
    format: CorpusFormat
    records: list[dict[str, Any]]


def resolve_format(record: dict[str, Any], *, format: str, text_column: str, messages_column: str, source: str) -> CorpusFormat:
    """``text`` or ``messages`` for a corpus whose first record is ``record`` (``format`` may be ``auto``)."""
    keys = list(record.keys())
    if format == "auto":
        if isinstance(record.get(text_column), str):
            return "text"
        if isinstance(record.get(messages_column), list):
            return "messages"
        raise AuditError(
            f"corpus '{source}' has neither a text column '{text_column}' nor a messages column '{messages_column}'."
            + did_you_mean(text_column, keys),
            fix=f"set corpus.text_column or corpus.messages_column to one of: {', '.join(keys)}")
    column = text_column if format == "text" else messages_column
    if column not in record:
        raise AuditError(f"corpus '{source}' has no column '{column}'." + did_you_mean(column, keys),
                         fix=f"set corpus.{'text_column' if format == 'text' else 'messages_column'} "
                             f"to one of: {', '.join(keys)}")
    return format  # type: ignore[return-value]


def load_records(source: str, *, text_column: str, max_records: int | None, builtin_n: int, seed: int,
                 format: str = "auto", messages_column: str = "messages") -> list[dict[str, Any]]:
    """Load a corpus as a list of records and check that every record has the format's column."""
    return load_corpus(source, text_column=text_column, max_records=max_records, builtin_n=builtin_n, seed=seed,
                       format=format, messages_column=messages_column).records


def load_corpus(source: str, *, text_column: str = "text", max_records: int | None = None, builtin_n: int = 240, seed: int = 0,
                format: str = "auto", messages_column: str = "messages") -> Corpus:
    from audit.data.inject import check_record

    if source.startswith("builtin:"):
        records = builtin_records(source.removeprefix("builtin:"), n=builtin_n, seed=seed)
    else:
        records = _load_with_datasets(source)
    if max_records is not None:
        records = records[:max_records]
    if not records:
        raise AuditError(f"corpus '{source}' is empty", fix="give a corpus with at least one record")
    fmt = resolve_format(records[0], format=format, text_column=text_column, messages_column=messages_column, source=source)
    for i, record in enumerate(records):
        check_record(record, i, format=fmt, text_column=text_column, messages_column=messages_column, source=source)
    check_texts(records, format=fmt, text_column=text_column, messages_column=messages_column, source=source)
    return Corpus(source=source, format=fmt, records=records)


def check_texts(records: list[dict[str, Any]], *, format: CorpusFormat, text_column: str, messages_column: str,
                source: str, warn: Callable[[str], None] | None = None) -> int:
    """Refuse a corpus with nothing to train on; return how many of its records are empty.

    Empty records are legal in real data (TRL trains them as a lone EOS), so a few are only counted and warned
    about; a corpus whose every record is empty would train the canaries alone, which is refused.
    """
    from audit.data.inject import record_texts

    empty = sum(1 for record in records
                if not any(t.strip() for t in record_texts(record, format=format, text_column=text_column,
                                                            messages_column=messages_column)))
    if empty == len(records):
        column = text_column if format == "text" else messages_column
        raise AuditError(f"corpus '{source}': all {len(records)} records are empty (column '{column}')",
                         fix=f"check corpus.{'text_column' if format == 'text' else 'messages_column'} "
                             "(is it the column that holds the text?)")
    if empty:
        (warn or _warn)(f"corpus '{source}': {empty} of {len(records)} records are empty "
                        "(each trains as a lone end-of-text token)")
    return empty


def _warn(message: str) -> None:
    import sys

    print(f"warning: {message}", file=sys.stderr, flush=True)


def stream_records(source: str, *, max_records: int | None = None, builtin_n: int = 240,
                   seed: int = 0) -> tuple[Callable[[], Iterator[dict[str, Any]]], int]:
    """A re-iterable stream over the corpus and its record count (one counting pass; memory stays flat)."""
    if source.startswith("builtin:"):
        records = builtin_records(source.removeprefix("builtin:"), n=builtin_n, seed=seed)[:max_records]
        return lambda: iter(records), len(records)
    ds = _open_with_datasets(source, streaming=True)

    def records() -> Iterator[dict[str, Any]]:
        try:
            for i, record in enumerate(ds):
                if max_records is not None and i >= max_records:
                    return
                yield record
        except AuditError:
            raise
        except Exception as exc:  # noqa: BLE001 - a decode error mid-stream becomes one user-facing line
            raise _unreadable(source, exc) from None

    count = _count_records(source, records)
    if max_records is not None:
        count = min(count, max_records)
    if count == 0:
        raise AuditError(f"corpus '{source}' is empty", fix="give a corpus with at least one record")
    return records, count


def _count_records(source: str, records: Callable[[], Iterator[dict[str, Any]]]) -> int:
    """Records in a corpus without decoding it where the format allows (JSON lines, parquet metadata)."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".jsonl":
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    if path.is_file() and path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(str(path)).metadata.num_rows
    return sum(1 for _ in records())


def _load_with_datasets(source: str) -> list[dict[str, Any]]:
    ds = _open_with_datasets(source, streaming=False)
    try:
        return ds.to_list()
    except Exception as exc:  # noqa: BLE001 - pyarrow decodes strings lazily: bad UTF-8 surfaces here
        raise _unreadable(source, exc) from None


def check_utf8(path: Path, *, chunk: int = 1 << 20) -> None:
    """Refuse a text corpus file that is not valid UTF-8, naming the line and byte of the first bad sequence.

    pyarrow reads JSON/CSV bytes without validating them and fails much later, when a string is first decoded
    (or, streaming, mid-run); decoding once up front costs one pass over the file at memory speed.
    """
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset, line = 0, 1
    with path.open("rb") as f:
        while block := f.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                at = offset + exc.start
                line += block[: exc.start].count(b"\n")
                raise AuditError(f"corpus file {path} is not valid UTF-8: "
                                 f"byte 0x{block[exc.start]:02x} at offset {at} (line {line})",
                                 fix="re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), or fix that record") from None
            offset += len(block)
            line += block.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise AuditError(f"corpus file {path} is not valid UTF-8: it ends inside a multi-byte character (truncated?)",
                             fix="re-export the file completely, as UTF-8") from None


def _first_bad_json_line(path: Path) -> str | None:
    """``line N: <reason>`` for the first line of a JSON-lines file that is not a JSON object, else None."""
    import json

    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except ValueError as exc:
                return f"line {number} is not valid JSON ({str(exc).split(':')[0]})"
            if not isinstance(value, dict):
                return f"line {number} is a JSON {type(value).__name__}, not an object"
    return None


def _unreadable(source: str, exc: BaseException) -> AuditError:
    """One line for a corpus the loaders could not read: a local file's own defect named, a hub id's fix for hub ids."""
    path = Path(source).expanduser()
    detail = str(exc).splitlines()[0] if str(exc) else ""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in {".jsonl", ".json", ".csv"}:
            check_utf8(path)  # raises with the position when that is the cause
        if suffix == ".jsonl" and (bad := _first_bad_json_line(path)):
            return AuditError(f"corpus file {path} is not valid JSON lines: {bad}",
                              fix="fix or drop that line (one JSON object per line); a truncated file needs re-exporting")
        if suffix == ".parquet":
            return AuditError(f"corpus file {path} is not a readable parquet file (corrupt or truncated): {detail}",
                              fix="re-export the file, or check that it is parquet")
        return AuditError(f"cannot read corpus file {path}: {type(exc).__name__}: {detail}",
                          fix="check that the file is a complete, valid " + (suffix.lstrip(".") or "data") + " file")
    if path.is_dir():
        return AuditError(f"cannot read the saved dataset {path}: {type(exc).__name__}: {detail}",
                          fix="point corpus.source at a directory written by datasets' save_to_disk")
    return AuditError(f"cannot load corpus '{source}': {type(exc).__name__}: {detail}",
                      fix="check corpus.source (offline, a hub id works only if it is cached)")


def _open_with_datasets(source: str, *, streaming: bool) -> Any:
    import logging

    import datasets

    datasets.disable_progress_bars()
    # datasets logs its own "Failed to load JSON ..." line before raising; the one line the user needs is ours
    logging.getLogger("datasets").setLevel(logging.CRITICAL)
    path = Path(source).expanduser()
    loaders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
            return ds.to_iterable_dataset() if streaming else ds
        if path.is_file():
            kind = loaders.get(path.suffix.lower())
            if kind is None:
                raise AuditError(f"corpus file {path} has an unsupported extension '{path.suffix}'",
                                 fix="use .jsonl, .json, .parquet or .csv, or a saved datasets directory")
            with path.open("rb") as f:  # datasets fails on an empty file with a bare StopIteration
                head = f.read(65536)
            if not head.strip() or (kind == "csv" and len(head.strip().splitlines()) < 2 and len(head) < 65536):
                raise AuditError(f"corpus '{source}' is empty", fix="give a corpus with at least one record")
            if kind in {"json", "csv"}:
                check_utf8(path)
            return datasets.load_dataset(kind, data_files=str(path), split="train", streaming=streaming)
        if path.suffix or source.startswith((".", "/", "~")):
            raise AuditError(f"corpus file {path} does not exist", fix="check corpus.source")
        return datasets.load_dataset(source, split="train", streaming=streaming)
    except AuditError:
        raise
    except Exception as exc:  # noqa: BLE001 - loader failures become one user-facing line
        raise _unreadable(source, exc) from None
