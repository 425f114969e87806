"""``report.json`` (the product of an audit) and the short table the CLI prints.

The report is an :class:`~audit.core.schema.AuditReport`: versioned, typed, and it reads back into the same object.
It carries canary ids and hashes, never secret text, so it can be shared with reviewers.
"""

from __future__ import annotations

import math
import platform
import statistics
import subprocess
import time
from collections import defaultdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from audit.core.console import text_table
from audit.core.gates import NULL_MEAN_EXPOSURE_BITS
from audit.core.layout import LAYOUT
from audit.core.schema import (
    AuditReport,
    CalibrationSummary,
    CanariesSummary,
    DisclosureSummary,
    DPAccounting,
    MetricEntry,
    ModelInfo,
    OutputsSummary,
    PersistenceSummary,
    ScoredBy,
    SequenceScore,
    TierSummary,
)
from audit.core.store import atomic_write_text

TRACKED_PACKAGES = ("canary-audit", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "mlflow")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_revision() -> str | None:
    here = Path(__file__).resolve().parents[2]  # the checkout, above audit/report/
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def build_report(*, run: Any, origin: Any, truth: Any, scores: list[SequenceScore], training: Any,
                 outputs: Any = None, works: Any = None, calibration: list[CalibrationSummary] | None = None,
                 releases: list[Any] | None = None) -> AuditReport:
    """Assemble ``report.json`` from the stages' results (``run``: :class:`audit.pipeline.stages.Run`; ``origin``:
    :class:`audit.pipeline.origin.Origin`; ``works``: :class:`audit.data.works.summary.WholeWorksResult` of the whole-work scan),
    then evaluate the recipe's gates on its flat metrics, once. ``calibration``: the scored models' gaps to the reference
    engine (:mod:`audit.score.calibration`), when the recipe asked for them. ``releases``: the recipe's releases made
    and scored (:class:`audit.pipeline.release.stage.Release`): their tiers, metrics under their labels, lineage nodes and
    ``report.release``. What the origin adds (``origin.report_inputs``: the Trainer callback's curve, its gates and
    its MLflow run) goes in here too, so nothing patches the report afterwards."""
    from audit.core import lineage
    from audit.core.gates import evaluate_gates
    from audit.data.works.information import works_information
    from audit.metrics.disclosure import redact_report
    from audit.metrics.suite import summarize_scores
    from audit.score.canaries import space_bits

    ctx = run.ctx
    given = origin.report_inputs  # :class:`audit.pipeline.origin.ReportInputs`
    recipe, resolved, canary_set, injection = ctx.recipe, ctx.resolved, truth.canaries, truth.injection
    base_node = lineage.node("base_weights", resolved.provenance.get("name", recipe.model.source), ctx.base_fingerprint,
                             source=recipe.model.source)
    data_node = lineage.data_node(recipe.corpus.source, canary_set.spec, injection.manifest.sha256(),
                                  n_records=len(injection.records), planted=recipe.canaries.inject)
    tuned_node = lineage.node("tuned_weights", lineage.tune_label(recipe.training.method, further=origin.further),
                              training.weights_fingerprint, [*origin.tuned_parents(base_node), data_node],
                              path=Path(training.weights_path).name)
    nodes = origin.lineage(base_node, data_node, tuned_node)
    nodes += lineage.derived_nodes(
        tuned_node, merged_fingerprint=training.merged_fingerprint, merged_path="merged",
        outputs_fingerprint=outputs.fingerprint if outputs else None,
        outputs_details={"file": LAYOUT.outputs, "samples": outputs.summary["protocol"]["samples"],
                         "samples_with_member_secret": outputs.summary["samples_with_member_secret"]} if outputs else None)
    dp = training.dp  # a DP-SGD run: the bounds at the accountant's delta, so the two eps are comparable
    scoring = recipe.scoring if dp is None else recipe.scoring.model_copy(update={"privacy_delta": dp.delta})
    # every metric under its stable key (audit.metrics.suite)
    suite = summarize_scores(scores, scoring, inclusion=recipe.canaries.inclusion)
    excerpts = works_information(canary_set, scores)
    release_scores = [s for r in releases or [] for s in r.scores]
    persistence = origin.persistence(scores + release_scores, suite.metrics)  # a further tune's releases: theirs too
    metrics: dict[str, MetricEntry] = {**suite.metrics, **excerpts.pop("metrics", {}), **(outputs.metrics if outputs else {}),
                                       **(persistence.metrics or {}), **(works.metrics if works else {})}
    release = None
    if releases:
        from audit.report.releases import release_metrics, release_nodes, release_summary

        tuned_rows = [s for s in scores if s.model == "tuned"]
        metrics.update(release_metrics(releases, [s for s in scores if s.model == "base"], tuned_rows, scoring,
                                       inclusion=recipe.canaries.inclusion))
        nodes += release_nodes(releases, tuned_node)
        release = release_summary(releases, tuned_rows, tuned_path=training.weights_path)
    if calibration:
        from audit.score.calibration import calibration_metrics

        metrics.update(calibration_metrics(calibration))
    notes = dict(suite.notes)
    if dp is not None:
        dp_metrics, dp_notes = accountant_metrics(dp, metrics, inclusion=recipe.canaries.inclusion)
        metrics.update(dp_metrics)
        notes.update(dp_notes)
    ctx.timings["total"] = time.perf_counter() - ctx.started
    report = AuditReport(
        run_id=run.dir.name,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        recipe=recipe.model_dump(mode="json"),
        recipe_fingerprint=recipe.fingerprint(),
        seed=recipe.seed,
        model=ModelInfo(source=recipe.model.source, kind=resolved.kind, path=str(resolved.path),
                        fingerprint=ctx.base_fingerprint, provenance=resolved.provenance),
        canaries=CanariesSummary.model_validate({**truth.summary(), "works_information": excerpts}),
        works=canary_set.works,
        manifest_sha256=injection.manifest.sha256(),
        training=training,
        space_bits=round(space_bits(canary_set), 6),
        exposure_max=round(math.log2(len(truth.reference_secrets) + 1), 6),
        tiers=summarize_tiers(scores + release_scores),
        lineage=nodes,
        timings_s={k: round(v, 3) for k, v in ctx.timings.items()},
        versions=package_versions(),
        git_revision=git_revision(),
        tracking=run.tracker.info() or given.tracking,
        metrics=metrics,
        metric_notes=notes,
        outputs=OutputsSummary.model_validate(outputs.summary) if outputs else None,
        # the models this run scored (a further tune's base and parent rows are the parent runs', in their reports)
        scored_by=[ScoredBy(model=m, backend=recipe.scoring.backend, precision=recipe.scoring.precision)
                   for m in dict.fromkeys(s.model for s in scores + release_scores)
                   if origin.parent_run is None or m == "tuned" or m.startswith("release:")],
        calibration=calibration or None,
        parent_run=origin.parent_run,
        persistence=None if persistence.summary is None else PersistenceSummary.model_validate(
            {**persistence.summary, "works": works.persistence if works else None}),
        whole_works=works.summary if works else None,
        # withheld whole-work keys (judged per group of works when made) join what redact_report withholds
        disclosure=DisclosureSummary(rule="", min_group=0, search_bits=0, withheld=works.withheld) if works else None,
        release=release,
    )
    curves = given.curves
    if curves is None:  # recorded while training (scoring.every_steps, audit.core.curves): the final values close each curve
        from audit.core.curves import read_curves

        curves = read_curves(run.dir)
    if curves:
        report = report.model_copy(update={"curves": close_curves(curves, report)})
    report = redact_report(report)  # the shared report: no guess-checker of a secret (audit.metrics.disclosure)
    gates = evaluate_gates([*recipe.gates, *given.gates], report.flat_metrics(), curves=report.curves)
    return report.model_copy(update={"gates": gates})


def close_curves(curves: dict[str, list[tuple[int, float]]], report: AuditReport, *,
                 steps: int | None = None) -> dict[str, list[tuple[int, float]]]:
    """Each curve ending with the report's final value at the last step (``steps``, default ``training.steps``): the
    final scoring measured the same weights as a point at that step would, in the run's protocol, so it replaces such
    a point; keys the report lacks keep their points as measured."""
    final = report.flat_metrics()
    steps = int(report.training.steps) if steps is None else int(steps)
    out: dict[str, list[tuple[int, float]]] = {}
    for key, points in sorted(curves.items()):
        kept = [(int(s), float(v)) for s, v in points if key not in final or int(s) < steps]
        if key in final and not math.isnan(final[key].value):
            kept.append((steps, float(final[key].value)))
        out[key] = sorted(kept)
    return out


def accountant_metrics(dp: DPAccounting, metrics: dict[str, MetricEntry], *,
                       inclusion: str) -> tuple[dict[str, MetricEntry], dict[str, str]]:
    """``privacy.eps_accountant`` and, per bound, ``privacy.tightness/<method>`` = eps_lb / eps_accountant, with
    ``privacy.tightness_max`` (a gate ``max: 1`` checks soundness) and the sampling assumptions the run satisfies."""
    from audit.metrics.privacy import compare_with_accountant, sampling_statement

    cmp = compare_with_accountant(dp.eps_accountant, {k: v.value for k, v in metrics.items()})
    out = {"privacy.eps_accountant": MetricEntry(value=dp.eps_accountant, n=dp.steps)}
    n = metrics["privacy.eps_lb"].n if "privacy.eps_lb" in metrics else None
    out.update({f"privacy.tightness/{method}": MetricEntry(value=t, n=n) for method, t in cmp.tightness.items()})
    if cmp.tightness:
        out["privacy.tightness_max"] = MetricEntry(value=cmp.tightness_max, n=n)
    how = (f"target eps {dp.target_epsilon:g}, noise multiplier solved: {dp.noise_multiplier:.4g}" if dp.target_epsilon
           else f"noise multiplier {dp.noise_multiplier:g}")
    notes = {"privacy.eps_accountant": (
        f"DP-SGD: {dp.accountant} accountant's eps at delta={dp.delta:g} for {dp.steps} steps at q={dp.sample_rate:.4g} "
        f"({how}, clip {dp.max_grad_norm:g}, {dp.records} records); every privacy.eps_lb/<method> is computed at the same "
        f"delta and must not exceed it ({'sound' if cmp.sound else 'EXCEEDED: a bound is above the accountant'}). "
        + sampling_statement(inclusion))}
    return out, notes


def summarize_tiers(scores: list[SequenceScore]) -> list[TierSummary]:
    """Mean exposure and extracted count per repetition tier and model (tier 0 = references)."""
    groups: dict[int, dict[str, list[SequenceScore]]] = defaultdict(lambda: defaultdict(list))
    for s in scores:
        groups[s.repetitions][s.model].append(s)
    tiers = []
    for reps in sorted(groups):
        by_model = groups[reps]
        n = len(next(iter(by_model.values())))
        ranked = {m: [x.exposure for x in rows if x.exposure is not None] for m, rows in sorted(by_model.items())}
        counts = {len(v) for v in ranked.values()}
        tiers.append(TierSummary(
            repetitions=reps,
            n=n,
            exposure_mean={m: round(statistics.fmean(v), 4) for m, v in ranked.items() if v},
            extracted={m: sum(x.extracted is True for x in rows) for m, rows in sorted(by_model.items())},
            # references outside scoring.exposure_null_references carry no rank: the mean is over the ranked ones
            exposure_n=None if counts == {n} else max(counts),
        ))
    return tiers


def write_report(report: AuditReport, path: Path) -> None:
    atomic_write_text(path, report.model_dump_json(indent=2) + "\n")


def read_report(path: Path) -> AuditReport:
    return AuditReport.model_validate_json(Path(path).read_text(encoding="utf-8"))


def format_table(report: AuditReport) -> str:
    """Per tier: mean exposure base vs tuned (bits) and how many canaries greedy decoding extracted."""
    from audit.metrics.disclosure import tier_models, withheld_keys

    withheld, models = withheld_keys(report), tier_models(report)
    header = ["tier", "n"] + [f"exposure {m}" for m in models] + [f"extracted {m}" for m in models]
    rows = []
    for t in report.tiers:
        label = "reference (never inserted)" if t.repetitions == 0 else f"{t.repetitions}x inserted"

        def cell(family: str, m: str, value: str | None, reps: int = t.repetitions) -> str:
            return value if value is not None else "withheld" if f"{family}/rep_{reps}/{m}" in withheld else "-"

        rows.append([label, str(t.n) if t.exposure_n is None else f"{t.n} ({t.exposure_n} ranked)"]
                    + [cell("exposure.mean", m, f"{t.exposure_mean[m]:.2f}" if m in t.exposure_mean else None) for m in models]
                    + [cell("extraction.exact", m, f"{t.extracted[m]}/{t.exposure_count}" if m in t.extracted else None)
                       for m in models])
    out = text_table(header, rows, numbers_right=True)
    if report.disclosure and report.disclosure.withheld:
        out.append(f"withheld: base-model numbers of groups under {report.disclosure.min_group} secrets (each would let "
                   "anyone with the public base model check guessed secrets; the run directory's scores.jsonl has them)")
    out.append(f"exposure = bits against {2 ** report.exposure_max - 1:.0f} sampled references (the headline scale; gates "
               f"use it); max {report.exposure_max:.2f} (rank 1 of {2 ** report.exposure_max:.0f}); "
               f"an unlearned canary averages ~{NULL_MEAN_EXPOSURE_BITS:.2f} (1/ln 2)")
    out.extend(format_metrics(report))
    return "\n".join(out)


HEADLINE_ATTACKS = ("loss_diff", "min_k_pp_diff", "ez_mia")
"""The base-calibrated attacks whose TPR at 1% FPR the summary prints overall and per tier (the field's headline):
the loss difference, Min-K%++ against the base (memaudit's headline) and EZ-MIA (Ilic et al. 2026) beside it."""


def mia_flag(notes: dict[str, str], attack: str) -> str | None:
    """How the summary prints an attack that :mod:`audit.metrics.suite` flagged in ``mia.inverted/<attack>`` (ranks
    members below references where another attack separates them) or ``mia.degenerate/<attack>`` (repeats loss's
    ordering): as not a result, naming the note; None for an attack whose numbers stand."""
    for kind in ("inverted", "degenerate"):
        if f"mia.{kind}/{attack}" in notes:
            return f"{kind} (not a result: see metric note mia.{kind}/{attack})"
    return None


def _rate(entry: MetricEntry) -> str:
    interval = "" if entry.low is None or entry.high is None else f" [{entry.low:.2f}, {entry.high:.2f}]"
    return f"{entry.value:.2f}{interval}"


def format_mia_headline(report: AuditReport) -> list[str]:
    """TPR at 1% FPR with its Clopper-Pearson interval for :data:`HEADLINE_ATTACKS`, overall and per tier, each with its
    n (members) and the AUC beside it (an attack the suite flagged: :func:`mia_flag`, no numbers); nothing when the run
    had too few references for 1% FPR."""
    m = report.metrics
    tiers = sorted(t.repetitions for t in report.tiers if t.repetitions > 0)
    controls = next((t.n for t in report.tiers if t.repetitions == 0), None)
    lines = []
    for attack in HEADLINE_ATTACKS:
        key = f"mia.tpr_at_1pct/{attack}"
        if key not in m:
            continue
        if flag := mia_flag(report.metric_notes, attack):
            lines.append(f"  {attack}: {flag}")
            continue
        parts = [f"all n={m[key].n} {_rate(m[key])}"
                 + (f" AUC {m[f'mia.auc/{attack}'].value:.2f}" if f"mia.auc/{attack}" in m else "")]
        for r in tiers:
            tier_key = f"{key}/rep_{r}"
            if tier_key in m:
                auc = m.get(f"mia.auc/{attack}/rep_{r}")
                parts.append(f"{r}x n={m[tier_key].n} {_rate(m[tier_key])}" + ("" if auc is None else f" AUC {auc.value:.2f}"))
        lines.append(f"  {attack}: " + "; ".join(parts))
    if not lines:
        return []
    return [f"TPR at 1% FPR (95% Clopper-Pearson interval; n = members, against {controls} references; AUC beside it):",
            *lines]


def format_null_calibration(report: AuditReport) -> list[str]:
    """The references' mean exposure under each model against the uniform-rank null (~1/ln 2 bits), with its interval,
    the z-test's p-value and the biased flag (:func:`audit.metrics.exposure.null_calibration`)."""
    m = report.metrics
    parts, biased, n = [], [], None
    for model in ("base", "tuned"):
        key = f"exposure.null_mean/{model}"
        if key not in m:
            continue
        n = m[key].n
        p = m.get(f"exposure.null_p/{model}")
        flag = m.get(f"exposure.null_biased/{model}")
        parts.append(f"{model} {_rate(m[key])}" + ("" if p is None else f" p={p.value:.2g}"))
        if flag is not None and flag.value > 0:
            biased.append(model)
    if not parts:
        return []
    verdict = (f"BIASED under {' and '.join(biased)} (p < 0.01): exposure thresholds do not sit against the null there"
               if biased else "not biased (p >= 0.01)")
    return [f"null calibration ({n} ranked references' mean exposure, 95% interval; unlearned ~{NULL_MEAN_EXPOSURE_BITS:.2f} "
            f"= 1/ln 2): {', '.join(parts)}; {verdict}"]


def format_metrics(report: AuditReport) -> list[str]:
    """A few readable lines over ``report.metrics`` (whole-space exposure, MIA, extraction, privacy, bits)."""
    m, notes = report.metrics, report.metric_notes
    if not m:
        return []
    member_tiers = sorted(t.repetitions for t in report.tiers if t.repetitions > 0)
    top = max(member_tiers, default=0)
    lines = [""]

    def val(key: str, fmt: str = ".2f") -> str | None:
        return format(m[key].value, fmt) if key in m else None

    parts = [f"{label} {val(f'exposure.space_mean/rep_{r}/tuned')}" for r, label in
             [(t, f"{t}x") for t in member_tiers] + [(0, "references")] if f"exposure.space_mean/rep_{r}/tuned" in m]
    if parts:
        exact = sum(round(m[f"exposure.exact_share/rep_{r}/tuned"].value * (m[f"exposure.exact_share/rep_{r}/tuned"].n or 0))
                    for r in member_tiers if f"exposure.exact_share/rep_{r}/tuned" in m)
        n_members = sum(t.n for t in report.tiers if t.repetitions > 0)
        lines.append(f"whole-space exposure (second scale: rank among all 2^{report.space_bits:.2f} secrets, not capped at "
                     f"{report.exposure_max:.2f}), tuned: {', '.join(parts)}; "
                     f"exact rank for {exact}/{n_members} members")
    aucs = [f"{a} {mia_flag(notes, a) or val(f'mia.auc/{a}')}" for a in ("loss_diff", "min_k_pp", "min_k_pp_diff", "zlib", "loss")
            if f"mia.auc/{a}" in m]
    if aucs:
        tpr = (f"TPR at 1% FPR (loss_diff) {val('mia.tpr_at_1pct/loss_diff')} "
               f"[{m['mia.tpr_at_1pct/loss_diff'].low:.2f}, {m['mia.tpr_at_1pct/loss_diff'].high:.2f}]"
               if "mia.tpr_at_1pct/loss_diff" in m else f"TPR at 1% FPR {notes.get('mia.tpr_at_1pct', 'not measured')}")
        headline = format_mia_headline(report)
        lines.append(f"membership inference, members vs references, AUC: {', '.join(aucs)}")
        lines.extend(headline or [f"  {tpr}"])
    lines.extend(format_null_calibration(report))
    ext = [f"greedy {int(sum(t.extracted.get('tuned', 0) for t in report.tiers if t.repetitions > 0))}/"
           f"{sum(t.n for t in report.tiers if t.repetitions > 0)} members"]
    for key, label in (("extraction.from_fraction", "from half the secret"), ("extraction.sampled_any", "by sampling"),
                       ("extraction.np_extractable", "(n, p)-extractable")):
        hits = [m[f"{key}/rep_{r}/tuned"] for r in member_tiers if f"{key}/rep_{r}/tuned" in m]
        if hits:
            ext.append(f"{label} {int(sum(h.value for h in hits))}/{sum(h.n or 0 for h in hits)}")
    lines.append(f"extraction (tuned): {', '.join(ext)}")
    if "privacy.eps_lb" in m:
        lines.append(f"privacy: epsilon >= {val('privacy.eps_lb')} (one run, {int(m['privacy.correct'].value)}/"
                     f"{int(m['privacy.guesses'].value)} guesses right; at most {val('privacy.eps_ceiling')} with that many)")
    if "privacy.eps_accountant" in m:
        acc = m["privacy.eps_accountant"].value
        beside = [f"{key.removeprefix('privacy.eps_lb/')} {m[key].value:.2f} ({m[key].value / acc:.0%})"
                  for key in sorted(m) if key.startswith("privacy.eps_lb/")]
        lines.append(f"privacy (DP-SGD): eps_accountant {acc:.2f}; eps_lb (tightness = eps_lb / eps_accountant): "
                     + (", ".join(beside) or "none computed"))
    if report.whole_works is not None:
        lines.append(format_whole_works(report))
    if f"information.bits/rep_{top}/tuned" in m:
        base = val(f"information.bits/rep_{top}/base", ".1f")
        under_base = (f"{base} bits under base, {val(f'information.bits/rep_{top}/tuned', '.1f')} under tuned"
                      if base is not None else
                      f"{val(f'information.bits/rep_{top}/tuned', '.1f')} bits under tuned (under base: withheld, "
                      f"{m[f'information.bits/rep_{top}/tuned'].n} secrets < {getattr(report.disclosure, 'min_group', '?')})")
        lines.append(f"information: a {top}x secret costs {under_base}; references "
                     f"{val('information.bits/rep_0/tuned', '.1f')} (secret space {report.space_bits:.1f} bits)")
    return lines


def format_whole_works(report: AuditReport) -> str:
    """One line on the audited whole works (docs/works.md): tuned extractable share and stored bits, members against the
    held-out control; ``withheld`` where the disclosure rule keeps a number out."""
    m = report.metrics

    def val(key: str, fmt: str) -> str:
        if key in m:
            return f"{format(m[key].value, fmt)} (n={m[key].n})"
        return "withheld" if report.disclosure and key in report.disclosure.withheld else "-"

    ww = report.whole_works
    assert ww is not None
    return (f"whole works ({ww.prefix_tokens} + {ww.suffix_tokens}-token windows every {ww.stride}), tuned: extractable "
            f"share members {val('works.extractable_share/member/tuned', '.2f')}, held out "
            f"{val('works.extractable_share/held_out/tuned', '.2f')}; "
            f"worst member {val('works.max_extractable_share/member/tuned', '.2f')}; "
            f"stored bits per work members {val('works.stored_bits/member', '.0f')}, held out "
            f"{val('works.stored_bits/held_out', '.0f')}; {val('works.stored_bits_per_param/member', '.3g')} bits per trainable "
            f"parameter (Morris et al.: ~{ww.morris_bits_per_param})")
