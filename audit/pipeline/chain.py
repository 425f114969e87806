"""Further tunes: fine-tune the tuned weights of an earlier run again and measure what survives of its canaries.

    audit run smollm2/lora_cpu                                 # the parent: base -> LoRA tune -> outputs
    audit run smollm2/clean_lora_cpu parent=runs/<that run>    # a further tune on clean data, on the parent's canaries
    audit chain                                                # both, one after the other (see audit.cli)

A further tune starts from the parent's tuned weights (a LoRA adapter is merged into the base in memory; full weights
are loaded as they are) and is measured on exactly the parent's canaries, reference secrets and scoring protocol:
``model``, ``canaries`` (all but ``canaries.inject``) and ``scoring`` come from the parent, and the canary set
is read from the chain's first run (``canaries.jsonl`` + ``canaries.meta.json``; regenerated from its recipe for a run
written before the sidecar) and checked against the parent's ``canaries.jsonl`` row by row
(:class:`audit.pipeline.origin.FurtherTune` is where a further tune differs from a first tune).
``canaries.inject: false`` trains on the clean corpus only (none of the canaries is planted again).

Its scores hold three models: ``base`` (the pretrained weights) and ``parent`` (the parent's tuned weights), both
reused from the parent run, which measured those very weights with the same protocol on the same device, and
``tuned`` (after the further tune). Persistence per repetition tier:

    retained_bits     = (bits_base - bits_after) / (bits_base - bits_before)
    retained_exposure = (exposure_after - exposure_base) / (exposure_before - exposure_base)

with ``bits`` the mean -log2 p(secret | prefix) and ``exposure`` the mean whole-space exposure. 1 means the further
tune kept everything the first tune taught, 0 that the canaries fell back to the base model's level; values below 0
(the secret now costs more than under the base) or above 1 are drift of the weights, not memorization. A ratio is
left out when the first tune taught less than :data:`MIN_LEARNED_BITS` (nothing to retain, only noise). With two
canaries per tier these are small-sample numbers: read them with the per-tier n.
Exposure saturates at log2|R| while bits do not, so ``retained_bits`` shows decay that exposure can hide. This is
the question catastrophic-forgetting studies ask of memorized sequences (Jagielski et al. 2023, "Measuring
forgetting of memorized training examples"): does a later tune on other data erase them?

The child's report carries the parent's lineage plus its own data and tuned-weights nodes (parents: the parent's
tuned weights and the clean data); the parent run gets one line per further tune appended to ``children.jsonl``.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from audit.core.console import text_table
from audit.core.errors import AuditError
from audit.core.layout import LAYOUT, read_versioned_rows, versioned
from audit.core.schema import (
    GGUF_TYPES,
    AuditReport,
    BeforeAfter,
    LineageNode,
    MetricEntry,
    PersistenceTier,
    Recipe,
    SequenceScore,
    TrainSummary,
)
from audit.core.store import read_scores

MIN_LEARNED_BITS = 1.0
"""A tier whose first tune lowered the secret's cost by less than this (bits) gets no retention ratio."""
PARENT_LABEL = "parent"


@dataclass(frozen=True)
class ParentRun:
    """A finished run whose tuned weights a further tune starts from."""

    run_dir: Path
    recipe: Recipe
    report: AuditReport
    train: TrainSummary
    weights_dir: Path
    parent: ParentRun | None
    """Its own parent, when it is itself a further tune."""

    @property
    def origin(self) -> ParentRun:
        """The chain's first run: where the canaries were drawn and planted."""
        return self if self.parent is None else self.parent.origin

    def lineage_chain(self) -> list[ParentRun]:
        """Runs from the origin to this one."""
        return ([] if self.parent is None else self.parent.lineage_chain()) + [self]

    def tuned_node(self) -> LineageNode:
        nodes = [n for n in self.report.lineage if n.kind == "tuned_weights" and n.fingerprint == self.train.weights_fingerprint]
        if not nodes:
            raise AuditError(f"{self.run_dir}/report.json has no lineage node for its tuned weights",
                             fix="give a run made by `audit run` of this version")
        return nodes[-1]


def load_parent(path: str | Path, *, _depth: int = 0) -> ParentRun:
    """Read and check a finished run directory: complete status, report, recipe, weights with the recorded fingerprint."""
    from audit.core.config import read_yaml, validate_recipe
    from audit.data.models import fingerprint_safetensors_dir
    from audit.report import read_report

    run_dir = Path(path).expanduser().resolve()
    if not run_dir.is_dir():
        raise AuditError(f"parent run {path} is not a directory", fix="set parent= to a run directory made by `audit run`")
    if _depth > 16:
        raise AuditError(f"parent chain of {run_dir} is deeper than 16 runs or loops",
                         fix="check the runs' recipe.yaml 'parent' keys")
    status = {}
    try:
        status = json.loads((run_dir / LAYOUT.status).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    if status.get("status") != "complete" or not (run_dir / LAYOUT.report).is_file():
        raise AuditError(f"parent run {run_dir} is not complete (status: {status.get('status', 'unknown')})",
                         fix=f"finish it first (`audit run --resume {path}`) or choose a complete run")
    try:
        report = read_report(run_dir / LAYOUT.report)
        train = TrainSummary.model_validate_json((run_dir / LAYOUT.train).read_text(encoding="utf-8"))
    except (OSError, ValidationError, ValueError) as exc:
        raise AuditError(f"parent run {run_dir} has an unreadable report.json or train.json ({type(exc).__name__})",
                         fix="choose a run made by `audit run` of this version") from None
    recipe = validate_recipe(read_yaml(run_dir / LAYOUT.recipe), source=str(run_dir / LAYOUT.recipe))
    weights_dir = run_dir / Path(train.weights_path).name
    found = fingerprint_safetensors_dir(weights_dir) if weights_dir.is_dir() else None
    if found != train.weights_fingerprint:
        raise AuditError(f"parent run {run_dir}: {weights_dir.name}/ does not hold the weights train.json records "
                         f"(fingerprint {str(found)[:12]} != {train.weights_fingerprint[:12]})",
                         fix="use an unmodified run directory")
    grandparent = load_parent(recipe.parent, _depth=_depth + 1) if recipe.parent else None
    return ParentRun(run_dir=run_dir, recipe=recipe, report=report, train=train, weights_dir=weights_dir, parent=grandparent)


def inherit(recipe: Recipe, parent: ParentRun) -> Recipe:
    """``recipe`` with the parent's model, canaries (keeping ``canaries.inject``), scoring and whole works (planted only
    when ``canaries.inject`` is), and its absolute path."""
    canaries = parent.recipe.canaries.model_copy(update={"inject": recipe.canaries.inject})
    works = parent.recipe.works
    if works is not None and "corpus" in works.sources:
        raise AuditError(f"parent run {parent.run_dir} audits corpus records as whole works: a further tune trains on "
                         "another corpus, so those records cannot be measured again",
                         fix="chain a run without works source 'corpus'")
    return recipe.model_copy(update={"model": parent.recipe.model, "canaries": canaries, "scoring": parent.recipe.scoring,
                                     "works": works, "parent": str(parent.run_dir)})


def check_same_device(parent: ParentRun, *, device: str, precision: str) -> None:
    """Reused scores are only comparable when both runs measured on the same kind of device and precision."""
    if (parent.train.device, parent.train.precision) != (device, precision):
        raise AuditError(f"parent run measured on {parent.train.device} {parent.train.precision}, this run would measure on "
                         f"{device} {precision}: the before/after numbers would not be comparable",
                         fix=f"run the further tune where the parent ran, or set training.precision={parent.train.precision}")


def release_overrides(value: str, last: Recipe) -> list[str]:
    """``audit chain --release q4_0,merged``: the ``release.*`` overrides that add those releases to the chain's last
    link, kept beside the ones its recipe already asks for, so the chain ends tuned -> ... -> release nodes (made and
    measured by the release stage, :mod:`audit.pipeline.release.stage`). An unknown format is one line naming the
    supported ones."""
    asked = [v.strip().lower() for v in value.split(",") if v.strip()]
    supported = ("merged", *GGUF_TYPES)
    unknown = [v for v in asked if v not in supported]
    if unknown or not asked:
        problem = f"unknown release format {', '.join(unknown)}" if unknown else "no format given"
        raise AuditError(f"--release {value!r}: {problem}",
                         fix=f"give one or more of {', '.join(supported)}, comma-separated (e.g. --release q4_0,merged; "
                             "K-quants need llama.cpp's llama-quantize)")
    have = last.release
    gguf = list(dict.fromkeys([*(have.gguf if have else []), *(v for v in asked if v != "merged")]))
    merged = "merged" in asked or bool(have and have.merged)
    return [f"release.merged={str(merged).lower()}", f"release.gguf=[{','.join(gguf)}]"]


# --------------------------------------------------------------------------------------------------- scores


def inherited_scores(parent: ParentRun) -> list[SequenceScore]:
    """``base`` rows from the chain's first run and the parent's ``tuned`` rows relabelled ``parent``."""
    def read(run_dir: Path, label: str) -> list[SequenceScore]:
        path = run_dir / LAYOUT.scores_of(label)
        return read_scores(path if path.is_file() else run_dir / LAYOUT.scores, model=label)

    base = read(parent.origin.run_dir, "base")
    before = [r.model_copy(update={"model": PARENT_LABEL}) for r in read(parent.run_dir, "tuned")]
    if not base or len(base) != len(before):
        raise AuditError(f"parent run {parent.run_dir} lacks base or tuned scores for every canary",
                         fix="choose a complete run made by `audit run` of this version")
    return base + before


def inherited_works_scan(parent: ParentRun) -> list[Any]:
    """The whole-work window rows a further tune reuses: ``base`` from the chain's first run and the parent's ``tuned``
    rows relabelled ``parent`` (both measured those very weights with the same windows)."""
    from audit.core.store import WorksScanFile

    base = [r for r in WorksScanFile("base").read(parent.origin.run_dir) or [] if r.model == "base"]
    before = [r.model_copy(update={"model": PARENT_LABEL}) for r in WorksScanFile("tuned").read(parent.run_dir) or []]
    if not base or len(base) != len(before):
        raise AuditError(f"parent run {parent.run_dir} lacks the base or tuned whole-work scan",
                         fix="choose a complete run made by `audit run` of this version")
    return base + before


# --------------------------------------------------------------------------------------------------- persistence


def _mean(rows: list[SequenceScore], get) -> float | None:
    values = [v for r in rows if (v := get(r)) is not None]
    return round(statistics.fmean(values), 6) if values else None


def _ratio(num: float | None, den: float | None, *, floor: float) -> float | None:
    if num is None or den is None or den < floor:
        return None
    return round(num / den, 6)


def persistence(scores: list[SequenceScore], *, base: str = "base", before: str = PARENT_LABEL, after: str = "tuned",
                min_learned_bits: float = MIN_LEARNED_BITS) -> tuple[list[dict[str, Any]], dict[str, MetricEntry]]:
    """Per repetition tier: bits, exposure and extraction under base / before / after, and the retained shares.

    Pure: rows in, numbers out (see the module docstring for the formulas). Tier 0, the references, is the control:
    its numbers should not move.
    """
    groups: dict[int, dict[str, list[SequenceScore]]] = defaultdict(lambda: defaultdict(list))
    for s in scores:
        groups[s.repetitions][s.model].append(s)
    tiers = []
    metrics: dict[str, MetricEntry] = {}
    for reps in sorted(groups):
        by = groups[reps]
        if not all(by.get(m) for m in (base, before, after)):
            continue
        n = len(by[after])
        bits = {k: _mean(by[m], lambda r: r.secret_nll_bits) for k, m in (("base", base), ("before", before), ("after", after))}
        space = {k: _mean(by[m], lambda r: r.exposure_space if r.exposure_space is not None else r.exposure)
                 for k, m in (("base", base), ("before", before), ("after", after))}
        sampled = {k: _mean(by[m], lambda r: r.exposure) for k, m in (("base", base), ("before", before), ("after", after))}
        extracted = {k: sum(r.extracted is True for r in by[m])
                     for k, m in (("base", base), ("before", before), ("after", after))}
        learned = None if bits["base"] is None or bits["before"] is None else bits["base"] - bits["before"]
        kept = None if bits["base"] is None or bits["after"] is None else bits["base"] - bits["after"]
        gained = None if space["base"] is None or space["before"] is None else space["before"] - space["base"]
        still = None if space["base"] is None or space["after"] is None else space["after"] - space["base"]
        row = {"repetitions": reps, "n": n, "bits": bits, "exposure_space": space, "exposure_sampled": sampled,
               "extracted": extracted,
               "retained_bits": _ratio(kept, learned, floor=min_learned_bits) if reps > 0 else None,
               "retained_exposure": _ratio(still, gained, floor=min_learned_bits) if reps > 0 else None}
        tiers.append(row)
        for key in ("retained_bits", "retained_exposure"):
            if row[key] is not None:
                metrics[f"persistence.{key}/rep_{reps}"] = MetricEntry(value=row[key], n=n)
    return tiers, metrics


def persistence_summary(scores: list[SequenceScore], parent: ParentRun, *, mia_after: float | None,
                        inject: bool) -> tuple[dict[str, Any], dict[str, MetricEntry]]:
    """``report.persistence`` and its metrics. Releases of this tune (rows labelled ``release:<format>``, the chain's
    last links) get the same tiers with the release as "after", under ``by_release`` and keys ending in their label
    (``persistence.retained_bits/rep_16/release:q4_0``): what is shipped still holds that much of the parent's canaries."""
    tiers, metrics = persistence(scores)
    releases = {}
    for label in sorted({s.model for s in scores if s.model.startswith("release:")}):
        releases[label], kept = persistence(scores, after=label)
        metrics.update({f"{key}/{label}": entry for key, entry in kept.items()})
    mia_key = "mia.auc/loss_diff"
    before = parent.report.metrics.get(mia_key)
    summary = {
        "parent_run": str(parent.run_dir), "origin_run": str(parent.origin.run_dir),
        "parent_tuned_fingerprint": parent.train.weights_fingerprint,
        "further_tune_planted_canaries": inject,
        "protocol": "same canaries, reference secrets and scoring section as the parent; base and before (the parent's "
                    "tuned weights) scores reused from the parent runs, after measured here",
        "min_learned_bits": MIN_LEARNED_BITS,
        "tiers": tiers,
        "mia_auc_loss_diff": {"before": None if before is None else before.value, "after": mia_after},
        "by_release": releases or None,
    }
    return summary, metrics


def format_persistence(tiers: list[PersistenceTier], mia_auc_loss_diff: BeforeAfter,
                       by_release: dict[str, list[PersistenceTier]] | None = None) -> str:
    """A small table (``report.persistence``'s tiers and MIA AUC): per tier, bits and whole-space exposure
    before/after, extraction, retained shares; then the same rows for each release of the further tune (``by_release``,
    "after" = the release), so the chain's table ends with what is shipped."""
    header = ["tier", "n", "bits base", "bits before", "bits after", "exposure before", "exposure after",
              "extracted before", "extracted after", "retained bits", "retained exposure"]
    rows = []

    def f(x: Any, fmt: str = ".2f") -> str:
        return "-" if x is None else format(x, fmt)

    for after, rows_of in [("", tiers), *[(f" {label}", t) for label, t in (by_release or {}).items()]]:
        for t in rows_of:
            rows.append([("references" if t.repetitions == 0 else f"{t.repetitions}x") + after, str(t.n),
                         f(t.bits.base, ".1f"), f(t.bits.before, ".1f"), f(t.bits.after, ".1f"),
                         f(t.exposure_space.before), f(t.exposure_space.after),
                         f"{t.extracted.before}/{t.n}", f"{t.extracted.after}/{t.n}",
                         f(t.retained_bits), f(t.retained_exposure)])
    lines = text_table(header, rows, numbers_right=True)
    lines.append("bits = mean -log2 p(secret | prefix); exposure over the whole space; before = the parent's tuned weights"
                 + ("; after = the further tune, or the release a row names" if by_release else "")
                 + f"; MIA AUC (loss_diff) before {f(mia_auc_loss_diff.before)}, after {f(mia_auc_loss_diff.after)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- lineage


def chain_lineage(parent: ParentRun, data_node: LineageNode, tuned_node: LineageNode) -> list[LineageNode]:
    """The parent's graph plus this tune's data and weights nodes (a node id already present is not repeated)."""
    nodes = list(parent.report.lineage)
    seen = {n.id for n in nodes}
    return nodes + [n for n in (data_node, tuned_node) if n.id not in seen]


def record_child(parent: ParentRun, *, run_dir: Path, tuned_node: LineageNode, metrics: dict[str, MetricEntry]) -> None:
    """Append this further tune to the parent's ``children.jsonl`` (one line, appended in a single write; a resumed
    run that already recorded itself is not recorded twice)."""
    path = parent.run_dir / LAYOUT.children
    me = str(Path(run_dir).resolve())
    if path.is_file() and any(row.get("run_dir") == me for row in read_versioned_rows(path)):
        return
    line = json.dumps(versioned(LAYOUT.children, {
        "run_dir": me, "node": tuned_node.id, "fingerprint": tuned_node.fingerprint,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "persistence": {k: v.value for k, v in sorted(metrics.items())}}), sort_keys=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
