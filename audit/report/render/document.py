"""The human report as one small document model, built once and written twice (HTML and Markdown).

Order (what a reviewer needs first comes first): verdict and gates, exposure by tier with the null band,
membership inference (ROC), extraction, information view, per-token view, lineage, provenance, everything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit.core.gates import NULL_MEAN_EXPOSURE_BITS
from audit.core.schema import AuditReport
from audit.report.render import plots, views
from audit.report.render.token_view import TokenView, read_token_views
from audit.report.render.views import fmt


@dataclass(frozen=True)
class Image:
    name: str
    """File name under ``plots/`` (also the artifact name in MLflow)."""
    png: bytes
    alt: str


@dataclass(frozen=True)
class Tokens:
    view: TokenView


@dataclass(frozen=True)
class Details:
    summary: str
    blocks: list[Any]


@dataclass(frozen=True)
class Verdict:
    verdict: views.Verdict


@dataclass(frozen=True)
class Code:
    text: str


Block = str | views.Table | Image | Tokens | Details | Verdict | Code
"""A paragraph (str, `backticks` for code), a table, an image, a token strip, a collapsible group, the verdict box,
or preformatted text."""


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Document:
    title: str
    subtitle: str
    sections: list[Section]

    def images(self) -> list[Image]:
        out: list[Image] = []

        def walk(blocks: list[Any]) -> None:
            for b in blocks:
                if isinstance(b, Image):
                    out.append(b)
                elif isinstance(b, Details):
                    walk(b.blocks)

        for s in self.sections:
            walk(s.blocks)
        return out


def _gates_section(report: AuditReport) -> Section:
    verdict = views.verdict(report)
    blocks: list[Block] = [Verdict(verdict)]
    if report.gates:
        rows = [[g.gate, g.metric, views.fmt(g.value, 3), g.threshold, "-" if g.n is None else str(g.n), g.status.upper(),
                 g.reason] for g in report.gates]
        blocks.append(views.Table(["gate", "metric", "value", "threshold", "n", "result", "reason"], rows,
                                  ["Re-check with `audit gate RUN_DIR` (exit 1 when a gate fails; `audit run` exits 1 "
                                   "too, unless --no-fail-on-gates).",
                                   "exposure.mean = exposure against the sampled references (the headline scale); "
                                   "exposure.space_mean = whole-space exposure (the second scale)."]))
    else:
        blocks.append("No gates configured for this recipe: add a `gates:` section (see `audit gate --help`) to turn "
                      "these measurements into a pass/fail decision.")
    return Section("verdict", "Verdict and gates", blocks)


def _exposure_section(report: AuditReport, scores: list[Any]) -> Section:
    rows = views.tier_rows(report)
    models = views.models_of(report)
    png = plots.exposure_by_tier(rows, views.exposure_points(scores), exposure_max=report.exposure_max, models=models)
    return Section("exposure", "Exposure by repetition tier", [
        Image("exposure_by_tier.png", png, "Mean exposure per repetition tier, base vs tuned, with the null band"),
        views.exposure_table(report),
    ])


CURVE_PANELS = (("exposure.mean", "exposure (bits, sampled refs)"), ("exposure.space_mean", "exposure (bits, whole space)"),
                ("extraction.exact", "extracted (greedy)"), ("mia.auc", "MIA AUC"))


def _curves_section(report: AuditReport) -> Section | None:
    """The memorization curve per tier (``report.curves``), when one was recorded."""
    if not report.curves:
        return None
    from audit.core.gates import natural_key

    panels = []
    for family, title in CURVE_PANELS:
        keys = sorted((k for k in report.curves if k.split("/")[0] == family), key=natural_key)
        if family == "mia.auc":
            keys = [k for k in keys if k in ("mia.auc/loss_diff", "mia.auc/min_k_pp")]
        if keys:
            panels.append((title, {k.split("/")[1]: report.curves[k] for k in keys}))
    if not panels:
        return None
    steps = sorted({s for pts in report.curves.values() for s, _ in pts})
    rows = [[k] + [views.fmt(dict(report.curves[k]).get(s), 3) for s in steps]
            for family, _ in CURVE_PANELS for k in sorted(report.curves, key=natural_key) if k.split("/")[0] == family]
    return Section("curves", "Memorization over training", [
        Image("curves.png", plots.memorization_curves(panels, null_bits=NULL_MEAN_EXPOSURE_BITS),
              "Exposure, extraction and MIA AUC per tier against the training step"),
        views.Table(["metric"] + [f"step {s}" for s in steps], rows,
                    ["Each point scores the canaries on the live model (scoring.every_steps, or CanaryAuditCallback); "
                     "the last point is the final audit. Gates read a curve with `of: max` or `of: first_step_above`."]),
    ])


def _mia_section(report: AuditReport, scores: list[Any]) -> Section:
    curves = views.roc_curves(scores)
    blocks: list[Block] = []
    if curves:
        blocks.append(Image("roc.png", plots.roc(curves), "ROC curves of the membership-inference attacks"))
    table = views.mia_table(report, curves)
    if table.rows:
        blocks.append(table)
    if not blocks:
        blocks.append("No membership-inference scores in this run (scores.jsonl has no MIA signals and report.json "
                      "no mia.* metrics).")
    return Section("mia", "Membership inference", blocks)


def _extraction_section(report: AuditReport) -> Section:
    blocks: list[Block] = [views.extraction_table(report)]
    if report.outputs:
        blocks.append("Generated outputs scanned for secrets and works: " + report.outputs.statement)
        blocks.extend(views.outputs_tables(report.outputs))
    return Section("extraction", "Extraction", blocks)


def _information_section(report: AuditReport) -> Section:
    blocks: list[Block] = []
    table = views.information_table(report)
    models = views.models_of(report)
    if table.rows:
        labels = [r[0] for r in table.rows]
        bits = {m: [report.metrics[f"information.bits/rep_{t.repetitions}/{m}"].value
                    if f"information.bits/rep_{t.repetitions}/{m}" in report.metrics else None
                    for t in report.tiers if views.information_label(t.repetitions) in labels] for m in models}
        blocks.append(Image("information.png", plots.information(labels, bits, space_bits=report.space_bits,
                                                                   title="Bits of the secret given its prefix"),
                            "Bits of the secret under base vs tuned, per tier"))
        blocks.append(table)
    works = views.works_table(report)
    if works.rows:
        by_work = report.canaries.works_information.by_work
        labels = [w.title[:18] for w in by_work]
        bits = {"base": [w.member_bits_base for w in by_work], "tuned": [w.member_bits_tuned for w in by_work]}
        blocks.append(Image("works_information.png", plots.information(labels, bits, space_bits=0.0,
                                                                         title="Bits per work (member excerpts)"),
                            "Bits per work under base vs tuned"))
        blocks.append(works)
    if not blocks:
        blocks.append("No information view in this run (no bits metrics and no sample works).")
    return Section("information", "Information view", blocks)


def _whole_works_section(report: AuditReport) -> Section | None:
    """Whole works as subjects: the statement, the table, the two-dimension chart, the maps and the passages."""
    ww = report.whole_works
    if ww is None:
        return None
    from audit.metrics.whole_works import extraction_log_threshold

    threshold = extraction_log_threshold(n=ww.n_queries, p=ww.p) / math.log(10)
    blocks: list[Block] = [ww.statement, views.whole_works_table(report)]
    if ww.stored_bits_per_param is not None:
        blocks.append(f"Member works: {fmt(ww.stored_bits_member_total, 1)} bits stored in {ww.trainable_params:,} trainable "
                      f"parameters = {ww.stored_bits_per_param:.3g} bits per parameter (Morris et al. 2025 measure a capacity "
                      f"of about {ww.morris_bits_per_param} bits per parameter); held-out works: "
                      f"{fmt(ww.stored_bits_held_out_total, 1)} bits (the control).")
    blocks.append(Image("works_dimensions.png", plots.works_two_dimensions(ww.works),
                        "Stored information against reconstruction fidelity, per work"))
    blocks.append(Image("works_maps.png", plots.work_maps(ww.works, threshold_log10=threshold),
                        "log10 p_z of every window along each work, base and tuned"))
    passages = views.whole_works_passages(report)
    if passages.rows:
        blocks.append(passages)
    return Section("whole-works", "Whole works: stored bits and extraction", blocks)


def _release_section(report: AuditReport) -> Section | None:
    """The releases (``report.release``): a plot of exposure and bits by format and a table per release."""
    if report.release is None or not report.release.releases:
        return None
    formats = ["tuned", *[r.label for r in report.release.releases]]
    tiers = report.tiers
    m = report.flat_metrics()

    def values(family: str) -> dict[str, list[float | None]]:
        return {views.tier_label(t.repetitions): [m[f"{family}/rep_{t.repetitions}/{f}"].value
                                                   if f"{family}/rep_{t.repetitions}/{f}" in m else None for f in formats]
                for t in tiers}

    png = plots.release_by_format([f.removeprefix("release:") for f in formats], [views.tier_label(t.repetitions) for t in tiers],
                                  values("exposure.mean"), values("information.bits"), exposure_max=report.exposure_max)
    size = report.release.tuned_bytes
    intro = ("What is shipped, measured like the tuned model: each release read back from its file (GGUF dequantized "
             "into fp32 as the format defines) and scored on the same canaries and references. Drift columns are "
             "release minus tuned, canary by canary" + (f"; the tuned weights as saved: {size / 1e6:.2f} MB." if size else "."))
    return Section("release", "Releases: what is shipped", [intro, Image("release_by_format.png", png,
                   "Exposure and bits of the secret per tier, tuned vs each release"), *views.release_tables(report)])


def _token_section(run_dir: Path) -> Section:
    token_views = read_token_views(run_dir)
    blocks: list[Block] = []
    for i, view in enumerate(token_views):
        blocks.append(Tokens(view))
        blocks.append(Image(f"tokens_{i}.png", plots.token_probabilities(view), f"Per-token probabilities: {view.title}"))
    if not token_views:
        blocks.append("No per-token view in this run directory (token_view.json / probe.json).")
    blocks.append("Probe any text against this run's weights: `audit report RUN_DIR --probe \"some text\"`.")
    return Section("tokens", "Per-token probability view", blocks)


def _lineage_section(report: AuditReport) -> Section:
    if not report.lineage:
        return Section("lineage", "Lineage", ["No lineage recorded."])
    nodes = {n.id: n for n in report.lineage}
    png = plots.lineage_graph(views.lineage_layers(report), nodes)
    rows = [[n.id, n.kind, n.label, ", ".join(n.parents) or "-", n.fingerprint] for n in report.lineage]
    return Section("lineage", "Lineage", [Image("lineage.png", png, "Lineage graph"),
                                          views.Table(["node", "kind", "label", "parents", "fingerprint"], rows)])


def build_document(report: AuditReport, run_dir: Path) -> Document:
    scores = views.run_scores(run_dir)
    t = report.training
    corpus = (report.recipe.get("corpus") or {}).get("source", "?")
    subtitle = (f"{report.model.source} \u00b7 {t.method} fine-tune, {t.steps} steps on {t.device} \u00b7 "
                f"data: {corpus} + {report.canaries.spec} canaries \u00b7 "
                f"{report.canaries.members} member canaries in tiers {report.canaries.tiers}, "
                f"{report.canaries.references} references \u00b7 run {report.run_id}")
    sections = [
        _gates_section(report),
        _exposure_section(report, scores),
        *[s for s in [_curves_section(report)] if s is not None],
        _mia_section(report, scores),
        _extraction_section(report),
        _information_section(report),
        *[s for s in [_whole_works_section(report)] if s is not None],
        *[s for s in [_release_section(report)] if s is not None],
        _token_section(run_dir),
        _lineage_section(report),
        Section("provenance", "Provenance of works and models", [views.provenance_table(report)]),
    ]
    if report.persistence:
        sections.append(Section("persistence", "Persistence through a further tune",
                                [Code(views.json_dump(report.persistence.model_dump(mode="json")))]))
    sections.append(Section("details", "All metrics and environment", [
        Details(f"All {len(views.all_metrics_table(report).rows)} metrics (the MLflow keys)", [views.all_metrics_table(report)]),
        Details("Metric notes", [f"{k}: {v}" for k, v in sorted(report.metric_notes.items())] or ["none"]),
        Details("Environment, versions and timings", [views.environment_table(report)]),
    ]))
    return Document(f"Canary audit: {report.recipe.get('name', report.run_id)}", subtitle, sections)
