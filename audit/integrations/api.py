"""The Python API for training you run yourself: plant the canaries in your dataset, then audit your Trainer.

    from audit import inject_canaries, CanaryAuditCallback

    train, gt = inject_canaries(dataset, model="HuggingFaceTB/SmolLM2-135M", out="gt")   # a datasets.Dataset
    trainer = SFTTrainer(model=..., train_dataset=train, callbacks=[CanaryAuditCallback(ground_truth=gt)])
    trainer.train()                                   # ends with runs/<name>-.../report.json, as `audit measure gt` writes

:func:`inject_canaries` is ``audit inject`` on a dataset in memory: the same canary generator, injection and
pre-flight (:func:`audit.data.ground_truth.prepare_ground_truth`), and the same ground-truth directory
(canaries.jsonl, canaries.meta.json, manifest.json, preflight.json, train.jsonl) plus recipe.yaml, inject.json and
train_dataset/ (:func:`audit.data.ground_truth.write_measure_record`) and the dataset as given (corpus.jsonl, the recipe's
corpus source), so ``audit measure`` and :class:`audit.integrations.callback.CanaryAuditCallback` read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from audit.core.errors import AuditError
from audit.core.layout import LAYOUT

"""The dataset as given (before injection; it holds no canary), the recipe's ``corpus.source``: so ``audit measure``
draws the injection again from the recipe alone, as for ``audit inject``, and checks it reproduces manifest.json."""


class InjectedDataset(NamedTuple):
    """What :func:`inject_canaries` returns; unpacks as ``train, gt = inject_canaries(...)``."""

    dataset: Any
    """The injected ``datasets.Dataset``: every original record, plus (``new_record``) one record per canary copy."""
    ground_truth: Path
    """The ground-truth directory (``audit measure GROUND_TRUTH_DIR``, ``CanaryAuditCallback(ground_truth=...)``)."""


def inject_canaries(
    dataset: Any,
    *,
    model: str,
    out: str | Path,
    spec: str = "digits",
    tiers: Sequence[int] = (1, 4, 16),
    members_per_tier: int = 2,
    references: int = 6,
    seed: int = 0,
    text_field: str = "text",
    messages_field: str = "messages",
    placement: str = "new_record",
    max_length: int = 1024,
    exposure_references: int = 255,
    name: str | None = None,
) -> InjectedDataset:
    """Plant seeded canaries in ``dataset`` (a ``datasets.Dataset`` with a ``text_field`` column or chat ``messages``).

    ``model``: the model source whose tokenizer the pre-flight uses (the base you will fine-tune). ``out``: a new or
    empty directory for the ground truth (it holds the secrets: keep it private). ``max_length``: the longest sequence
    your trainer keeps; the callback checks again against the trainer's real dataset and collator at train begin.
    ``spec``, ``tiers``, ``members_per_tier``, ``references``, ``seed``, ``placement``: as in a recipe's ``canaries``
    and ``corpus`` sections. Bad input raises :class:`audit.core.errors.AuditError` before anything is written.
    """

    from audit.core.keys import resolve_key
    from audit.core.schema import Recipe
    from audit.data.ground_truth import (
        load_tokenizer,
        prepare_ground_truth,
        refuse_added_tokens,
        write_ground_truth,
        write_measure_record,
    )
    from audit.data.models import resolve_model
    from audit.data.validate import check_new_output_dir

    out = Path(out).expanduser().resolve()
    check_new_output_dir(out, fix="give inject_canaries a new or empty out= directory in a folder you can write")
    records = _records_of(dataset)
    try:
        recipe = Recipe.model_validate({
            "name": name or f"inject-{out.name}"[:100],
            "seed": seed,
            "model": {"source": model},
            "canaries": {"spec": spec, "tiers": list(tiers), "members_per_tier": members_per_tier, "references": references},
            "corpus": {"source": str(out / LAYOUT.corpus), "text_column": text_field,
                       "messages_column": messages_field, "placement": placement},
            "training": {"max_length": max_length},
            "scoring": {"exposure_references": exposure_references},
        })
    except Exception as exc:  # pydantic's ValidationError: one line naming the field
        from pydantic import ValidationError

        if not isinstance(exc, ValidationError):
            raise
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise AuditError(f"inject_canaries: {where}: {err['msg']} (got {err.get('input')!r})",
                         fix="correct that argument") from None
    refuse_added_tokens(recipe, "inject_canaries")
    corpus = _corpus_of(records, recipe)
    resolved = resolve_model(model, progress=False)
    tokenizer = load_tokenizer(resolved.path)
    truth = prepare_ground_truth(recipe, tokenizer=tokenizer, corpus=corpus, key=resolve_key(recipe.canaries.key_file))
    from audit.core.store import write_jsonl

    out.mkdir(parents=True, exist_ok=True)
    write_ground_truth(truth, out, dataset=True)
    write_jsonl(out / LAYOUT.corpus, records)
    write_measure_record(recipe, out, resolved=resolved)  # recipe.yaml, inject.json, train_dataset/: what `audit measure` reads
    return InjectedDataset(dataset=_dataset_of(truth.injection.records), ground_truth=out)


def _records_of(dataset: Any) -> list[dict[str, Any]]:
    if isinstance(dataset, list):
        return [dict(r) for r in dataset]
    to_list = getattr(dataset, "to_list", None)
    if to_list is None:
        raise AuditError(f"inject_canaries takes a datasets.Dataset (or a list of records), not {type(dataset).__name__}",
                         fix="pass datasets.Dataset.from_list(records), or a DatasetDict's split (dataset['train'])")
    return to_list()


def _corpus_of(records: list[dict[str, Any]], recipe: Any) -> Any:
    """The records as a :class:`audit.data.corpus.Corpus`, checked as a corpus file would be."""
    from audit.data.corpus import Corpus, check_texts, resolve_format
    from audit.data.inject import check_record

    c = recipe.corpus
    if not records:
        raise AuditError("inject_canaries: the dataset is empty", fix="give a dataset with at least one record")
    fmt = resolve_format(records[0], format=c.format, text_column=c.text_column, messages_column=c.messages_column,
                         source="the dataset")
    for i, record in enumerate(records):
        check_record(record, i, format=fmt, text_column=c.text_column, messages_column=c.messages_column, source="the dataset")
    check_texts(records, format=fmt, text_column=c.text_column, messages_column=c.messages_column, source="the dataset")
    return Corpus(source=c.source, format=fmt, records=records)


def _dataset_of(records: list[dict[str, Any]]) -> Any:
    """A ``Dataset`` with every column any record has (a planted record has only the text or messages column: the
    others are None), in record order."""
    from datasets import Dataset

    columns: dict[str, None] = {}
    for r in records:
        columns.update(dict.fromkeys(r))
    return Dataset.from_dict({k: [r.get(k) for r in records] for k in columns})
