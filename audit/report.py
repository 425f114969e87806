"""``report.json`` (the product of an audit) and the short table the CLI prints.

The report is an :class:`~audit.schema.AuditReport`: versioned, typed, and it reads back into the same object.
It carries canary ids and hashes, never secret text, so it can be shared with reviewers.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from audit.schema import AuditReport, SequenceScore, TierSummary
from audit.store import atomic_write_text


def summarize_tiers(scores: list[SequenceScore]) -> list[TierSummary]:
    """Mean exposure and extracted count per repetition tier and model (tier 0 = references)."""
    groups: dict[int, dict[str, list[SequenceScore]]] = defaultdict(lambda: defaultdict(list))
    for s in scores:
        groups[s.repetitions][s.model].append(s)
    tiers = []
    for reps in sorted(groups):
        by_model = groups[reps]
        n = len(next(iter(by_model.values())))
        tiers.append(TierSummary(
            repetitions=reps,
            n=n,
            exposure_mean={m: round(statistics.fmean(x.exposure for x in rows), 4) for m, rows in sorted(by_model.items())},
            extracted={m: sum(x.extracted for x in rows) for m, rows in sorted(by_model.items())},
        ))
    return tiers


def tier_metrics(tiers: list[TierSummary]) -> dict[str, float]:
    """Stable MLflow keys: ``exposure.mean/rep_16/tuned``, ``extraction.exact/rep_16/tuned`` (rep_0 = references)."""
    out: dict[str, float] = {}
    for t in tiers:
        for model, value in t.exposure_mean.items():
            out[f"exposure.mean/rep_{t.repetitions}/{model}"] = value
        for model, value in t.extracted.items():
            out[f"extraction.exact/rep_{t.repetitions}/{model}"] = float(value)
    return out


def write_report(report: AuditReport, path: Path) -> None:
    atomic_write_text(path, report.model_dump_json(indent=2) + "\n")


def read_report(path: Path) -> AuditReport:
    return AuditReport.model_validate_json(Path(path).read_text(encoding="utf-8"))


def format_table(report: AuditReport) -> str:
    """Per tier: mean exposure base vs tuned (bits) and how many canaries greedy decoding extracted."""
    models = sorted({m for t in report.tiers for m in t.exposure_mean}, key=lambda m: (m != "base", m))
    header = ["tier", "n"] + [f"exposure {m}" for m in models] + [f"extracted {m}" for m in models]
    rows = []
    for t in report.tiers:
        label = "reference (never inserted)" if t.repetitions == 0 else f"{t.repetitions}x inserted"
        rows.append([label, str(t.n)]
                    + [f"{t.exposure_mean[m]:.2f}" for m in models]
                    + [f"{t.extracted[m]}/{t.n}" for m in models])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append(f"exposure in bits; max {report.exposure_max:.2f} (rank 1 of {2 ** report.exposure_max:.0f}); "
               f"an unlearned canary averages ~1.44 (1/ln 2)")
    return "\n".join(out)
