"""What the human report shows, as plain data: verdict, exposure rows with their null band, ROC curves, tables.

Pure (numpy/scipy, no matplotlib, no torch): the HTML and Markdown writers and the plots all read these, so the
two formats cannot disagree. Inputs are the run directory's files: ``report.json`` and, when present,
``scores.jsonl`` (per-canary rows, ids only) — nothing is recomputed from a model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from audit.core.gates import NULL_MEAN_EXPOSURE_BITS
from audit.core.layout import LAYOUT
from audit.core.schema import AuditReport, OutputsSummary, SequenceScore, WholeWorkRow
from audit.core.store import read_scores
from audit.metrics.disclosure import tier_models, withheld_keys

WITHHELD = "withheld"
"""A cell whose number the disclosure rule kept out of the shared report (:mod:`audit.metrics.disclosure`)."""

MIA_ATTACKS_SHOWN = ("loss_diff", "min_k_pp_diff", "min_k_pp", "zlib", "loss")


def tier_label(repetitions: int) -> str:
    return "references" if repetitions == 0 else f"{repetitions}x"


def null_band(n: int, *, cap: float | None = None, level: float = 0.95) -> tuple[float, float]:
    """Central ``level`` interval of the MEAN exposure (bits) of ``n`` unlearned canaries.

    The sum of ``n`` Exp(1) exposures in nats is Gamma(n, 1), so the mean in bits is Gamma(n, 1) / (n ln 2); capped
    at ``cap`` (log2(references + 1): the sampled rank cannot show more).
    """
    from scipy.stats import gamma

    if n < 1:
        raise ValueError("n must be at least 1")
    a = (1 - level) / 2
    low, high = (float(gamma.ppf(q, n)) / (n * math.log(2)) for q in (a, 1 - a))
    if cap is not None:
        low, high = min(low, cap), min(high, cap)
    return round(low, 4), round(high, 4)


@dataclass(frozen=True)
class TierRow:
    repetitions: int
    n: int
    exposure: dict[str, float]
    extracted: dict[str, int]
    band: tuple[float, float]
    ranked: int | None = None
    """Canaries behind ``exposure`` (and ``band``) when not all ``n`` were ranked (``scoring.exposure_null_references``)."""

    @property
    def label(self) -> str:
        return tier_label(self.repetitions)

    def above_null(self, model: str = "tuned") -> bool:
        return model in self.exposure and self.exposure[model] > self.band[1]


def tier_rows(report: AuditReport) -> list[TierRow]:
    return [TierRow(t.repetitions, t.n, dict(t.exposure_mean), dict(t.extracted),
                    null_band(max(1, t.exposure_count), cap=report.exposure_max), t.exposure_count)
            for t in report.tiers]


def models_of(report: AuditReport) -> list[str]:
    return tier_models(report)


@dataclass(frozen=True)
class Verdict:
    status: str
    """``pass`` / ``fail`` (gates decided) or ``none`` (no gates configured)."""
    headline: str
    findings: list[str]
    meaning: str = ""
    """What the status means for the release, in words (shown under the headline)."""


def _gates_held(n: int) -> str:
    return "the one gate this recipe sets held" if n == 1 else f"all {n} gates this recipe sets held"


def verdict(report: AuditReport) -> Verdict:
    """Gates decide pass/fail; the findings say in words what the numbers show, whether gates exist or not.

    With two or more member tiers the most-repeated one is the positive control: canaries planted that often are
    meant to be memorized, so their memorization shows the audit can see memorization (and its absence means the
    run could not have caught any). The verdict says so, so a green PASS next to "memorized" reads as intended.
    """
    rows = tier_rows(report)
    members = [r for r in rows if r.repetitions > 0]
    control = max(members, key=lambda r: r.repetitions) if len(members) >= 2 else None
    findings = []
    if control is not None:
        if control.above_null("tuned"):
            findings.append(f"Positive control: the {control.label} tier (canaries planted {control.repetitions} times, "
                            f"to be memorized) is above the 95% null band ({fmt(control.exposure.get('tuned'))} bits): "
                            "the audit can see memorization in this model, so the other tiers' numbers mean something.")
        else:
            findings.append(f"Positive control missing: the {control.label} tier (planted {control.repetitions} times) is "
                            "not above the 95% null band, so this run could not have detected memorization; train "
                            "longer or plant more copies before reading the other tiers as safe.")
    above = [r.label for r in members if r.above_null("tuned") and r is not control]
    below = [r.label for r in members if not r.above_null("tuned") and r is not control]
    if above:
        findings.append(f"Tuned-model exposure is above the 95% null band for tier{'s' if len(above) > 1 else ''} "
                        f"{', '.join(above)}: those canaries were memorized (an unlearned canary averages "
                        f"{NULL_MEAN_EXPOSURE_BITS:.2f} bits).")
    if below:
        findings.append(f"Tier{'s' if len(below) > 1 else ''} {', '.join(below)} stay{'' if len(below) > 1 else 's'} within "
                        "the null band: no memorization detected there at this sample size.")
    elif members and control is None and not above:
        findings.append("No member tier's tuned-model exposure is above the 95% null band: no memorization detected "
                        "at this sample size.")
    refs = next((r for r in rows if r.repetitions == 0), None)
    if refs is not None and refs.above_null("tuned"):
        findings.append("The never-inserted references are above the null band: the measurement itself is biased "
                        "(e.g. the references share structure the tuning taught); read the member tiers with care.")
    n_members = sum(r.n for r in members)
    extracted = sum(r.extracted.get("tuned", 0) for r in members)
    if members:
        per_tier = ", ".join(f"{r.label} {r.extracted.get('tuned', 0)}/{r.n}"
                             for r in sorted(members, key=lambda r: -r.repetitions))
        findings.append(f"Greedy decoding from the prefix reproduced {extracted} of {n_members} member secrets verbatim "
                        f"({per_tier}).")
    from audit.report import format_mia_headline, format_null_calibration

    headline = format_mia_headline(report)
    if headline:  # the field's MIA headline: TPR at 1% FPR with its interval, overall and per tier, AUC beside it
        findings.append("Membership inference, " + headline[0].rstrip(":") + ": "
                        + " | ".join(line.strip() for line in headline[1:]) + ".")
    elif "mia.auc/loss_diff" in report.metrics:
        findings.append(f"Membership inference (loss vs base, members against references): AUC "
                        f"{report.metrics['mia.auc/loss_diff'].value:.2f} (0.5 = chance); TPR at 1% FPR "
                        f"{report.metric_notes.get('mia.tpr_at_1pct', 'not measured')}.")
    findings.extend(line[0].upper() + line[1:] + "." for line in format_null_calibration(report))
    if report.gates:
        failed = [g for g in report.gates if not g.passed]
        skipped = sum(g.status == "skip" for g in report.gates)
        if failed:
            return Verdict("fail", f"FAIL: {len(failed)} of {len(report.gates)} release gates failed", findings,
                           "Do not release as is: " + "; ".join(f"'{g.gate}' failed ({g.reason or g.threshold})" for g in failed)
                           + ". `audit run` and `audit gate` exit 1 on this report.")
        extra = f" ({skipped} skipped)" if skipped else ""
        control_note = (f" The memorized {control.label} positive control does not count against the release: it "
                        "is planted to be memorized." if control is not None and control.above_null("tuned") else "")
        return Verdict("pass", f"PASS: all {len(report.gates)} release gates passed{extra}", findings,
                       f"What PASS means for the release: {_gates_held(len(report.gates))} for these weights (table "
                       "below)." + control_note
                       + " PASS is a statement about these gates at this sample size, not a proof that nothing leaks.")
    return Verdict("none", "No gates configured: this report measures, it does not decide", findings,
                   "Add a `gates:` section to the recipe to turn these measurements into a release decision.")


# ------------------------------------------------------------------------------------------------ scores & ROC


def run_scores(run_dir: Path) -> list[SequenceScore]:
    """The run's ``scores.jsonl`` rows (:func:`audit.core.store.read_scores`), or none when the run has no such file."""
    path = Path(run_dir) / LAYOUT.scores
    return read_scores(path) if path.is_file() else []


@dataclass(frozen=True)
class RocCurve:
    attack: str
    fpr: list[float]
    tpr: list[float]
    auc: float
    n_members: int
    n_controls: int


def roc_curve(members: list[float], controls: list[float]) -> tuple[list[float], list[float]]:
    """Empirical ROC (higher score = member): one point per distinct threshold, from (0, 0) to (1, 1)."""
    m, c = np.asarray(members, dtype=float), np.asarray(controls, dtype=float)
    thresholds = np.unique(np.concatenate([m, c]))[::-1]
    fpr, tpr = [0.0], [0.0]
    for t in thresholds:
        fpr.append(float(np.mean(c >= t)))
        tpr.append(float(np.mean(m >= t)))
    if fpr[-1] != 1.0 or tpr[-1] != 1.0:
        fpr.append(1.0)
        tpr.append(1.0)
    return fpr, tpr


def roc_curves(scores: list[SequenceScore], *, attacks: tuple[str, ...] = MIA_ATTACKS_SHOWN) -> list[RocCurve]:
    """ROC of each membership attack on the tuned model: member canaries (all tiers) against the references.

    Attack scores come from :func:`audit.metrics.suite.attack_scores` (the same orientation and calibration as the
    ``mia.auc/<attack>`` metrics), so the curve's area is the reported AUC.
    """
    from audit.metrics.mia import roc_auc
    from audit.metrics.suite import attack_scores

    base = {s.canary_id: s for s in scores if s.model == "base"}
    per_attack: dict[str, tuple[list[float], list[float]]] = {}
    for row in (s for s in scores if s.model == "tuned"):
        for attack, value in attack_scores(row, base.get(row.canary_id)).items():
            if math.isfinite(value):
                members, controls = per_attack.setdefault(attack, ([], []))
                (members if row.repetitions > 0 else controls).append(value)
    curves = []
    for attack in attacks:
        members, controls = per_attack.get(attack, ([], []))
        if members and controls:
            fpr, tpr = roc_curve(members, controls)
            curves.append(RocCurve(attack, fpr, tpr, round(roc_auc(members, controls), 4), len(members), len(controls)))
    return curves


def roc_groups(curves: list[RocCurve]) -> list[list[RocCurve]]:
    """Curves grouped where they coincide exactly (same points: the attacks rank members and references alike).

    The plot draws one line per group and names every attack in it, so five legend entries never hide behind
    three visible lines.
    """
    groups: dict[tuple[tuple[float, ...], tuple[float, ...]], list[RocCurve]] = {}
    for c in curves:
        groups.setdefault((tuple(c.fpr), tuple(c.tpr)), []).append(c)
    return list(groups.values())


def exposure_points(scores: list[SequenceScore]) -> dict[tuple[int, str], list[float]]:
    """Per (tier, model): every canary's exposure, for the dots over the tier means."""
    out: dict[tuple[int, str], list[float]] = {}
    for s in scores:
        if s.exposure is not None:  # a reference outside the null sample has no rank
            out.setdefault((s.repetitions, s.model), []).append(s.exposure)
    return {k: sorted(v) for k, v in sorted(out.items())}


# ------------------------------------------------------------------------------------------------ metric tables


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.{digits}f}"


def _metric(report: AuditReport, key: str) -> str:
    entry = report.metrics.get(key)
    if entry is None:
        return WITHHELD if key in withheld_keys(report) else "-"
    text = fmt(entry.value)
    if entry.low is not None and entry.high is not None:
        text += f" [{fmt(entry.low)}, {fmt(entry.high)}]"
    return text


def exposure_table(report: AuditReport) -> Table:
    models = models_of(report)
    rows = []
    for r in tier_rows(report):
        withheld = withheld_keys(report)
        row = [r.label, str(r.n) if r.ranked in (None, r.n) else f"{r.n} ({r.ranked} ranked)"]
        row += [fmt(r.exposure[m]) if m in r.exposure else WITHHELD if f"exposure.mean/rep_{r.repetitions}/{m}" in withheld
                else "-" for m in models]
        row.append(f"{r.band[0]:.2f} - {r.band[1]:.2f}")
        row += [_metric(report, f"exposure.space_mean/rep_{r.repetitions}/{m}") for m in models
                if f"exposure.space_mean/rep_{r.repetitions}/{m}" in report.metrics.keys() | withheld]
        rows.append(row)
    space_cols = [f"whole-space exposure {m}" for m in models
                  if any(f"exposure.space_mean/rep_{t.repetitions}/{m}" in report.metrics.keys() | withheld_keys(report)
                         for t in report.tiers)]
    header = ["tier", "n"] + [f"exposure {m}" for m in models] + ["null band (95%)"] + space_cols
    notes = [f"Exposure (the headline scale, used by the gates and `audit run`'s table): bits against "
             f"{report.canaries.exposure_references} sampled references, at most {report.exposure_max:.2f} "
             f"(rank 1 of {2 ** report.exposure_max:.0f}); "
             f"an unlearned canary averages {NULL_MEAN_EXPOSURE_BITS:.2f} bits, and the "
             "band is where the mean of that many unlearned canaries falls 95% of the time."]
    if space_cols:
        notes.append(f"Whole-space exposure (a second scale, keys exposure.space_mean): the secret ranked against all of "
                     f"its {report.space_bits:.1f}-bit space, so not capped at {report.exposure_max:.2f} (exact where the "
                     "trie walk finished, else estimated with its interval).")
    return Table(header, [r[: len(header)] for r in rows], notes)


def extraction_table(report: AuditReport) -> Table:
    models = models_of(report)
    columns = [("greedy exact", None), ("from part of the secret", "extraction.from_fraction"),
               ("by sampling", "extraction.sampled_any"), ("(n, p)\u2011extractable", "extraction.np_extractable"),
               ("mean LCP tokens", "extraction.lcp_mean")]
    present = [(label, key) for label, key in columns
               if key is None or any(f"{key}/rep_{t.repetitions}/{m}" in report.metrics for t in report.tiers for m in models)]
    header = ["tier", "n", "model"] + [label for label, _ in present]
    rows = []
    for t in report.tiers:
        for m in models:
            row = [tier_label(t.repetitions), str(t.n), m]
            for _, key in present:
                if key is None:
                    row.append(f"{t.extracted[m]}/{t.exposure_count}" if m in t.extracted
                               else WITHHELD if f"extraction.exact/rep_{t.repetitions}/{m}" in withheld_keys(report) else "-")
                elif (entry := report.metrics.get(f"{key}/rep_{t.repetitions}/{m}")) is None:
                    row.append(_metric(report, f"{key}/rep_{t.repetitions}/{m}"))
                else:
                    row.append(fmt(entry.value) if key.endswith("_mean") else f"{fmt(entry.value)}/{entry.n or t.n}")
            rows.append(row)
    notes = [v for k, v in sorted(report.metric_notes.items()) if k.startswith("extraction")]
    return Table(header, rows, notes)


def mia_table(report: AuditReport, curves: list[RocCurve]) -> Table:
    from audit.report import mia_flag

    attacks = [a for a in MIA_ATTACKS_SHOWN if f"mia.auc/{a}" in report.metrics] or [c.attack for c in curves]
    from_curves = {c.attack: c for c in curves}
    rows = []
    for a in attacks:
        if flag := mia_flag(report.metric_notes, a):  # inverted or a repeat of loss: named, not printed as a result
            rows.append([a, flag, "-", "-"])
            continue
        auc = _metric(report, f"mia.auc/{a}") if f"mia.auc/{a}" in report.metrics else fmt(from_curves[a].auc)
        rows.append([a, auc, _metric(report, f"mia.tpr_at_1pct/{a}"), _metric(report, f"mia.tpr_at_0.1pct/{a}")])
    notes = [f"{k}: {v}" for k, v in sorted(report.metric_notes.items()) if k.startswith(("mia", "privacy"))]
    for group in roc_groups(curves):
        if len(group) > 1:
            notes.insert(0, f"The ROC curves of {', '.join(c.attack for c in group)} coincide exactly (they rank members "
                            "and references the same way): the plot draws them as one line.")
    if "privacy.eps_lb" in report.metrics:
        notes.insert(0, f"One-run privacy audit: epsilon >= {_metric(report, 'privacy.eps_lb')} "
                        f"(at most {_metric(report, 'privacy.eps_ceiling')} can be shown with this many guesses).")
    return Table(["attack", "AUC", "TPR at 1% FPR", "TPR at 0.1% FPR"], rows, notes)


def information_label(repetitions: int) -> str:
    return "references (control)" if repetitions == 0 else tier_label(repetitions)


def information_table(report: AuditReport) -> Table:
    models = models_of(report)
    rows = []
    for t in report.tiers:
        cells = [_metric(report, f"information.bits/rep_{t.repetitions}/{m}") for m in models]
        if all(c == "-" for c in cells):
            continue
        rows.append([information_label(t.repetitions), str(t.n), *cells,
                     _metric(report, f"information.memorized_bits/rep_{t.repetitions}")])
    notes = [f"Bits of the secret given its prefix (sum of -log2 p over its tokens); the secret space holds "
             f"{report.space_bits:.1f} bits. Bits saved = base - tuned: positive when the tuned model finds the secret "
             "more likely than the base did (memorized bits for a member tier). The references were never inserted, "
             "so their row is the control: what tuning did to secrets it never saw (negative = less likely than "
             "under the base model, e.g. the tuning taught other digits)."] if rows else []
    return Table(["tier", "n", *[f"bits {m}" for m in models], "bits saved by tuning"], rows, notes)


def outputs_tables(outputs: OutputsSummary) -> list[Table]:
    """The outputs stage (:mod:`audit.score.outputs`) as tables: secrets found per tier, works overlap, the protocol."""
    n = outputs.protocol.samples
    rows = [[information_label(t.repetitions) if t.repetitions == 0 else tier_label(t.repetitions),
             str(t.canaries), str(t.exact_canaries), str(t.near_canaries), f"{t.samples_exact}/{n}",
             f"{t.samples_exact_or_near}/{n}", fmt(t.rate_exact_high, 3)] for t in outputs.tiers]
    tables = [Table(["tier", "canaries", "found verbatim", "found near", "samples verbatim", "samples verbatim or near",
                     "95% upper bound, per-sample rate"], rows,
                    [f"Near = within {outputs.protocol.near_max_edits} edits ({outputs.protocol.near_unit}). The "
                     "references were never inserted: hits on them are this scan's false positives."])]
    if outputs.works:
        tables.append(Table(["excerpts", "longest common run (tokens)", "mean run (tokens)", "mean n-gram share",
                             "samples with an n-gram"],
                            [[role, str(w.lcs_tokens_max), fmt(w.lcs_tokens_mean), fmt(w.ngram_share_mean, 4),
                              f"{w.samples_with_ngram}/{n}"] for role, w in outputs.works.items()]))
    if outputs.whole_works:
        tables.append(Table(["whole works", "works", "mean nv-recall", "max nv-recall", "longest block (tokens)", "blocks"],
                            [[role, str(w.works), fmt(w.nv_recall_mean, 4), fmt(w.nv_recall_max, 4),
                              str(w.longest_block_tokens), str(w.blocks)] for role, w in outputs.whole_works.items()],
                            ["nv-recall (Ahmed et al. 2026): share of a work's tokens inside a long near-verbatim block of "
                             "some sample; held-out works are the control"]))
    prows = [[k.replace("_", " "), ", ".join(f"{p.id}: {p.text!r}" for p in outputs.protocol.prompts) if k == "prompts"
              else str(v)] for k, v in outputs.protocol.model_dump().items()]
    prows.append(["tokens generated", str(outputs.tokens_generated)])
    if outputs.works_note:
        prows.append(["works", outputs.works_note])
    tables.append(Table(["protocol", ""], prows))
    return tables


def works_table(report: AuditReport) -> Table:
    rows = [[w.title, w.kind, w.license, str(w.member_excerpts), fmt(w.member_bits_base), fmt(w.member_bits_tuned),
             str(w.held_out_excerpts), fmt(w.held_out_bits_base), fmt(w.held_out_bits_tuned)]
            for w in report.canaries.works_information.by_work]
    return Table(["work", "kind", "license", "member excerpts", "bits base", "bits tuned", "held-out excerpts",
                  "bits base", "bits tuned"], rows)


def whole_works_table(report: AuditReport) -> Table:
    """One row per audited whole work: provenance, role, code length base -> tuned, stored bits, fidelity (tuned)."""
    ww = report.whole_works
    if ww is None:
        return Table([], [])

    def both(w: WholeWorkRow, field: str, digits: int = 2) -> str:
        base, tuned = w.models.get("base"), w.models.get("tuned")
        left = fmt(getattr(base, field), digits) if base is not None else WITHHELD if "base" in w.models else "-"
        return f"{left} -> {fmt(getattr(tuned, field), digits) if tuned is not None else '-'}"

    rows = []
    for w in ww.works:
        tuned = w.models.get("tuned")
        stored = WITHHELD if w.stored_bits is None and "base" in w.models else fmt(w.stored_bits, 1)
        rows.append([w.title[:40], w.kind, w.license[:40], w.role, str(w.copies), str(w.n_tokens),
                     both(w, "bits_per_byte"), stored,
                     both(w, "extractable_share"), fmt(tuned.greedy_share) if tuned else "-",
                     str(tuned.longest_greedy_run) if tuned else "-"])
    notes = [f"windows of {ww.prefix_tokens} + {ww.suffix_tokens} tokens every {ww.stride}; (n, p)-extractable: "
             f"1 - (1 - p_z)^{ww.n_queries} >= {ww.p:g}; every window in the run directory's {ww.file}"]
    return Table(["work", "kind", "license", "role", "copies", "tokens", "bits/byte base -> tuned", "stored bits",
                  "extractable share base -> tuned", "greedy share (tuned)", "longest greedy run (tokens)"], rows, notes)


def whole_works_passages(report: AuditReport) -> Table:
    """The longest passages the tuned model reproduces greedily: position and length; text for public-domain works."""
    ww = report.whole_works
    rows = [[w.title[:40], w.kind, str(p.start_token), str(p.tokens),
             p.text if p.text is not None else "(not public domain: position and length only)"]
            for w in (ww.works if ww else []) for p in w.passages]
    return Table(["work", "kind", "start token", "tokens", "text"], rows)


def release_tables(report: AuditReport) -> list[Table]:
    """One table per release (``report.release``): per tier its exposure, whole-space exposure, extraction and bits
    beside the drift from the tuned model (``bits_release - bits_tuned``, exposure likewise, ranks that changed)."""
    if report.release is None:
        return []
    header = ["tier", "n", "exposure", "exposure - tuned", "whole-space exposure", "extracted", "bits", "bits - tuned",
              "ranks changed"]
    tables = []
    for r in report.release.releases:
        rows = [[tier_label(t.repetitions), str(t.n), fmt(t.exposure_mean), fmt(t.exposure_drift, 3), fmt(t.exposure_space_mean),
                 f"{t.extracted}/{t.n}", fmt(t.bits), fmt(t.bits_drift, 3), f"{t.rank_changes}/{t.n}"] for t in r.tiers]
        what = "the LoRA adapter merged into the base (safetensors)" if r.kind == "merged" else f"GGUF {r.quantization.upper()}"
        tables.append(Table(header, rows, [f"{r.label}: {what}, {r.path}, {r.bytes / 1e6:.2f} MB, "
                                           f"fingerprint {r.fingerprint[:16]}, "
                                           f"written, read back and scored in {r.seconds:.1f} s"]))
    return tables


def provenance_table(report: AuditReport) -> Table:
    rows = [["base model", report.model.source, f"{report.model.kind}; {report.model.path}", report.model.fingerprint]]
    for key in ("name", "revision", "snapshot", "license", "package", "version"):
        if report.model.provenance.get(key):
            rows.append([f"base model {key}", str(report.model.provenance[key]), "", ""])
    rows.append(["training data", str(report.recipe.get("corpus", {}).get("source", "")),
                 f"{report.canaries.spec} canaries, {report.canaries.placements} copies planted",
                 report.manifest_sha256])
    t = report.training
    saved = f", trained in {t.precision}" + (f", saved in {t.weights_dtype}" if t.weights_dtype else "")
    rows.append(["tuned weights", f"{t.method} fine-tune, {t.steps} steps{saved}", t.weights_path, t.weights_fingerprint])
    if report.training.merged_fingerprint:
        rows.append(["merged weights", "adapter merged into the base", report.training.merged_path or "",
                     report.training.merged_fingerprint])
    for w in report.works:
        rows.append([f"work: {w.title}", f"{w.kind}, {w.license}", w.source + (f" ({w.path})" if w.path else ""), w.sha256])
    if report.parent_run:
        rows.append(["parent run", report.parent_run, "", ""])
    return Table(["item", "what", "where", "sha256 / fingerprint"], rows)


def environment_table(report: AuditReport) -> Table:
    rows = [["run", report.run_id], ["created", report.created_at], ["recipe", str(report.recipe.get("name", ""))],
            ["recipe fingerprint", report.recipe_fingerprint], ["seed", str(report.seed)],
            ["git revision", report.git_revision or "unknown"]]
    rows += [[f"version {k}", v] for k, v in sorted(report.versions.items())]
    rows += [[f"time {k}", f"{v:.1f} s"] for k, v in report.timings_s.items()]
    if report.tracking is not None:
        rows += [["MLflow run", report.tracking.run_id], ["MLflow", report.tracking.ui_command]]
    return Table(["", ""], rows)


def all_metrics_table(report: AuditReport) -> Table:
    from audit.report.tracking import report_metric_dict

    flat = report_metric_dict(report)
    rows = []
    for key in sorted(flat):
        entry = report.metrics.get(key)
        n = "-" if entry is None or entry.n is None else str(entry.n)
        interval = "" if entry is None or entry.low is None else f"[{fmt(entry.low, 3)}, {fmt(entry.high, 3)}]"
        rows.append([key, fmt(flat[key], 4), n, interval])
    return Table(["key (MLflow metric)", "value", "n", "95% interval"], rows)


def lineage_layers(report: AuditReport) -> list[list[str]]:
    """Node ids by depth (roots first), for drawing the derivative chain left to right."""
    parents = {n.id: [p for p in n.parents if p in {m.id for m in report.lineage}] for n in report.lineage}
    depth: dict[str, int] = {}

    def d(node: str) -> int:
        if node not in depth:
            depth[node] = 0 if not parents[node] else 1 + max(d(p) for p in parents[node])
        return depth[node]

    for n in report.lineage:
        d(n.id)
    layers: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for n in report.lineage:
        layers[depth[n.id]].append(n.id)
    return layers


def json_dump(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str)
