"""The information view of sample works: bits per excerpt under base vs tuned, by kind of work and by role.

Each excerpt canary is scored like any canary: ``secret_nll_bits`` = -log2 p(continuation | its first tokens).
Grouped by the work's ``kind`` and by role, the drop from base to tuned is what fine-tuning stored
(:mod:`audit.metrics.information`: memorized bits = bits_base - bits_tuned):

* ``public_domain`` members start low under the base model if pretraining already carries the text (the start
  of the derivative chain); ``synthetic`` members start at the model's own sampling entropy and can only drop
  through fine-tuning.
* ``held_out`` excerpts of the same works are the control: their drop is what tuning on neighbouring text (style,
  names) gives for free, not memorization of the planted excerpts.

Pure: ids and numbers in, numbers out; no text.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from audit.core.schema import CanarySet, MetricEntry, SequenceScore


def works_information(canaries: CanarySet, scores: list[SequenceScore], *, base: str = "base",
                      tuned: str = "tuned") -> dict[str, Any]:
    """``{"metrics": {key: MetricEntry}, "by_work": [...]}`` for the work excerpts in ``canaries`` (empty if none).

    The metrics go into ``report.metrics`` (``works.bits/<kind>/<role>/<model>``, each with its ``n`` excerpts); the
    per-work rows stay in ``report.canaries.works_information`` for the human report.
    """
    works = {w.id: w for w in canaries.works}
    by_canary: dict[str, dict[str, float]] = defaultdict(dict)
    for s in scores:
        by_canary[s.canary_id][s.model] = s.secret_nll_bits
    groups: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    per_work: dict[str, dict[str, Any]] = {}
    for c in canaries.canaries:
        if c.work not in works or base not in by_canary[c.id] or tuned not in by_canary[c.id]:
            continue
        b, t = by_canary[c.id][base], by_canary[c.id][tuned]
        kind = works[c.work].kind
        role = "member" if c.is_member else "held_out"
        groups[(kind, role)].append((b, t))
        w = per_work.setdefault(c.work, {"work_id": c.work, "title": works[c.work].title, "kind": kind,
                                         "license": works[c.work].license, "source": works[c.work].source,
                                         "member": [0, 0.0, 0.0], "held_out": [0, 0.0, 0.0]})
        w[role][0] += 1
        w[role][1] += b
        w[role][2] += t
    metrics: dict[str, MetricEntry] = {}
    for (kind, role), pairs in sorted(groups.items()):
        n = len(pairs)
        metrics[f"works.bits/{kind}/{role}/{base}"] = MetricEntry(value=round(statistics.fmean(b for b, _ in pairs), 4), n=n)
        metrics[f"works.bits/{kind}/{role}/{tuned}"] = MetricEntry(value=round(statistics.fmean(t for _, t in pairs), 4), n=n)
        metrics[f"works.memorized_bits/{kind}/{role}"] = MetricEntry(value=round(statistics.fmean(b - t for b, t in pairs), 4),
                                                                     n=n)
        metrics[f"works.n/{kind}/{role}"] = MetricEntry(value=float(n), n=n)
    by_work = []
    for w in sorted(per_work.values(), key=lambda w: (w["kind"], w["title"])):
        row = {k: w[k] for k in ("work_id", "title", "kind", "license", "source")}
        for role in ("member", "held_out"):
            n, b, t = w[role]
            row[f"{role}_excerpts"] = n
            row[f"{role}_bits_{base}"] = round(b, 3)
            row[f"{role}_bits_{tuned}"] = round(t, 3)
        by_work.append(row)
    return {"metrics": metrics, "by_work": by_work} if by_work else {}
