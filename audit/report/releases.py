"""A run's releases in the report: their tiers beside the tuned model's, their metrics under their labels, their
lineage nodes (:mod:`audit.pipeline.release.stage` makes and scores them). Imported by :mod:`audit.report`; it imports neither the
stages nor the pipeline, so there is no import cycle."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from audit.core.schema import MetricEntry, ReleaseRow, ReleaseSummary, ReleaseTier, SequenceScore


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 6) if values else None


def release_tiers(tuned: list[SequenceScore], release: list[SequenceScore]) -> list[ReleaseTier]:
    """Per tier: the release's exposure (both scales), extraction and bits, and its drift from the tuned model
    canary by canary (``bits_release - bits_tuned``, exposure likewise, ranks that changed)."""
    by_id = {s.canary_id: s for s in tuned}
    tiers = []
    for reps in sorted({s.repetitions for s in release}):
        rows = [s for s in release if s.repetitions == reps]
        pairs = [(by_id[s.canary_id], s) for s in rows if s.canary_id in by_id]
        tiers.append(ReleaseTier(
            repetitions=reps, n=len(rows),
            exposure_mean=_mean([s.exposure for s in rows if s.exposure is not None]),
            exposure_space_mean=_mean([s.exposure_space for s in rows if s.exposure_space is not None]),
            extracted=sum(s.extracted is True for s in rows),
            bits=_mean([s.secret_nll_bits for s in rows]),
            bits_drift=_mean([r.secret_nll_bits - t.secret_nll_bits for t, r in pairs]),
            exposure_drift=_mean([r.exposure - t.exposure for t, r in pairs
                                  if r.exposure is not None and t.exposure is not None]),
            rank_changes=sum(t.rank != r.rank for t, r in pairs),
        ))
    return tiers


def release_metrics(releases: list[Any], base: list[SequenceScore], tuned: list[SequenceScore], scoring: Any, *,
                    inclusion: str) -> dict[str, MetricEntry]:
    """Each release's metrics under its label, computed by the suite that computes the tuned model's
    (:func:`audit.metrics.suite.summarize_scores` with the release in the tuned model's place, against the same base):
    per-tier keys end in the label already; the others (``mia.auc/loss_diff``, ``privacy.eps_lb``, ...) get it
    appended; base keys are left out (the report has them). Plus the drift: ``release.bits_drift/rep_<r>/<label>``,
    ``release.exposure_drift/...`` and ``release.rank_changes/...``."""
    from audit.metrics.suite import summarize_scores

    out: dict[str, MetricEntry] = {}
    for r in releases:
        suite = summarize_scores(base + r.scores, scoring, inclusion=inclusion, tuned_label=r.label)
        for key, entry in suite.metrics.items():
            last = key.rsplit("/", 1)[-1]
            if last == "base":
                continue
            out[key if last == r.label else f"{key}/{r.label}"] = entry
        for tier in release_tiers(tuned, r.scores):
            for name in ("bits_drift", "exposure_drift"):
                value = getattr(tier, name)
                if value is not None:
                    out[f"release.{name}/rep_{tier.repetitions}/{r.label}"] = MetricEntry(value=value, n=tier.n)
            out[f"release.rank_changes/rep_{tier.repetitions}/{r.label}"] = MetricEntry(value=float(tier.rank_changes), n=tier.n)
    return out


def release_summary(releases: list[Any], tuned: list[SequenceScore], *, tuned_path: str | None) -> ReleaseSummary:
    """``report.release``: one row per release, its tiers beside the tuned model's."""
    size = None
    if tuned_path and Path(tuned_path).exists():
        size = (sum(p.stat().st_size for p in Path(tuned_path).rglob("*") if p.is_file()) if Path(tuned_path).is_dir()
                else Path(tuned_path).stat().st_size)
    return ReleaseSummary(tuned_bytes=size, releases=[
        ReleaseRow(label=r.label, kind=r.kind, quantization=r.quantization, path=r.path, fingerprint=r.fingerprint,
                   bytes=r.bytes, seconds=r.seconds, tiers=release_tiers(tuned, r.scores)) for r in releases])


def release_nodes(releases: list[Any], tuned_node: Any) -> list[Any]:
    """One lineage node per release, its parent the tuned weights: kind, quantization, the file's fingerprint."""
    from audit.core import lineage

    return [lineage.node("release", f"{'merged safetensors' if r.kind == 'merged' else 'GGUF ' + r.quantization} release",
                         r.fingerprint, [tuned_node], path=r.path, quantization=r.quantization, form=r.kind, bytes=r.bytes,
                         model_label=r.label) for r in releases]
