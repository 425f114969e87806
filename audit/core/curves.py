"""Memorization curves: the audit's metrics at training steps, not only at the end. Pure (standard library).

A point is one scoring pass of the canaries on the live model (:class:`audit.integrations.callback.CurveRecorder`), summarized
(:func:`audit.integrations.callback.point_metrics`) with the same suite as the final report
(:func:`audit.metrics.suite.summarize_scores` and the tier means), so a
curve's keys are the report's flat metric keys (``exposure.mean/rep_16/tuned``, ``extraction.exact/rep_16/tuned``,
``exposure.space_mean/rep_16/tuned``, ``mia.auc/loss_diff``, ...). Keys of the base model are left out (constant
over training). The report keeps them in ``curves`` (key -> ``[(step, value), ...]``); ``close_curves`` ends each
curve with the report's final value, and gates read them with ``of: max | first_step_above`` (:mod:`audit.core.gates`).

    runs/<run>/curves.json   {"schema_version": 1, "curves": {key: [[step, value], ...]}} while ``audit run`` trains
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from audit.core.layout import LAYOUT
from audit.core.schema import SCHEMA_VERSION

Curves = dict[str, list[tuple[int, float]]]


def add_point(curves: Curves, step: int, metrics: dict[str, float]) -> None:
    """Append ``metrics`` at ``step`` (a step measured twice keeps its last measurement)."""
    for key, value in metrics.items():
        points = curves.setdefault(key, [])
        if points and points[-1][0] == step:
            points[-1] = (step, value)
        else:
            points.append((step, value))


def write_curves(run_dir: Path, curves: Curves) -> None:
    from audit.core.store import atomic_write_text

    atomic_write_text(Path(run_dir) / LAYOUT.curves, json.dumps(
        {"schema_version": SCHEMA_VERSION, "curves": {k: [list(p) for p in v] for k, v in sorted(curves.items())}},
        indent=1) + "\n")


def read_curves(run_dir: Path) -> Curves:
    """The curves ``audit run`` recorded in ``run_dir`` (empty when it recorded none)."""
    path = Path(run_dir) / LAYOUT.curves
    if not path.is_file():
        return {}
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return {k: [(int(s), float(v)) for s, v in pts] for k, pts in data.get("curves", {}).items()}
