"""Fine-tuning corpora: a built-in generated one, or a Hugging Face ``datasets`` source.

The built-in ``notes`` corpus is short office and maintenance notes made from templates with a seeded stream:
it needs no download, has no license question (the project's own text, CC0) and looks enough like a small
SFT set for canaries to be learned the way they would be in real data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from audit.errors import AuditError, did_you_mean
from audit.rng import SeededStream

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

BUILTIN_CORPORA = ("notes",)


def builtin_records(name: str, *, n: int, seed: int) -> list[dict[str, Any]]:
    """Generate ``n`` records ``{"text": ...}`` of the built-in corpus ``name``."""
    if name not in BUILTIN_CORPORA:
        raise AuditError(f"unknown built-in corpus '{name}'." + did_you_mean(name, BUILTIN_CORPORA),
                         fix=f"use one of: {', '.join('builtin:' + c for c in BUILTIN_CORPORA)}")
    rng = SeededStream(seed, f"corpus:{name}")
    records = []
    for _ in range(n):
        text = rng.choice(_TEMPLATES).format(
            p=rng.choice(_PEOPLE), t=rng.choice(_THINGS), l=rng.choice(_PLACES), s=rng.choice(_STATES), a=rng.choice(_ACTIONS)
        )
        records.append({"text": text})
    return records


def load_records(source: str, *, text_column: str, max_records: int | None, builtin_n: int, seed: int) -> list[dict[str, Any]]:
    """Load a corpus as a list of records and check that ``text_column`` holds strings."""
    if source.startswith("builtin:"):
        records = builtin_records(source.removeprefix("builtin:"), n=builtin_n, seed=seed)
    else:
        records = _load_with_datasets(source)
    if max_records is not None:
        records = records[:max_records]
    if not records:
        raise AuditError(f"corpus '{source}' is empty", fix="give a corpus with at least one record")
    if text_column not in records[0]:
        raise AuditError(
            f"corpus '{source}' has no column '{text_column}'." + did_you_mean(text_column, records[0].keys()),
            fix=f"set corpus.text_column to one of: {', '.join(records[0].keys())}",
        )
    for i, record in enumerate(records):
        if not isinstance(record.get(text_column), str):
            raise AuditError(f"corpus '{source}' record {i}: column '{text_column}' is not text",
                             fix="point corpus.text_column at a string column")
    return records


def _load_with_datasets(source: str) -> list[dict[str, Any]]:
    import datasets

    datasets.disable_progress_bars()
    path = Path(source).expanduser()
    loaders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        elif path.is_file():
            kind = loaders.get(path.suffix.lower())
            if kind is None:
                raise AuditError(f"corpus file {path} has an unsupported extension '{path.suffix}'",
                                 fix="use .jsonl, .json, .parquet or .csv, or a saved datasets directory")
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        elif path.suffix or source.startswith((".", "/", "~")):
            raise AuditError(f"corpus file {path} does not exist", fix="check corpus.source")
        else:
            ds = datasets.load_dataset(source, split="train")
    except AuditError:
        raise
    except Exception as exc:  # noqa: BLE001 - loader failures become one user-facing line
        raise AuditError(f"cannot load corpus '{source}': {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                         fix="check corpus.source (offline, a hub id works only if it is cached)") from None
    return ds.to_list()
