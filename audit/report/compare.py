"""``audit compare``: several audits side by side, read from MLflow, as a table and a plot.

    audit compare runs/smollm2-lora-cpu-<...> runs/smollm2-full-cpu-<...>   # run directories (report.json names the MLflow run)
    audit compare 0123abcd...                                              # MLflow run ids
    audit compare canary-audit --plot compare.png                          # every finished run of an experiment

Per run: its data (corpus and canary spec), mean exposure of the tuned model by repetition tier (the headline scale:
bits against the sampled references, ``exposure.mean``, the scale of the per-tier table and the shipped gates), the
top tier's whole-space exposure in its own labelled column (``exposure.space_mean``: rank over the whole secret
space, not capped at log2(references + 1)), how many canaries greedy decoding extracted per tier,
membership-inference AUC (``loss_diff``), the one-run epsilon lower bound, the final train loss and the wall time.
A run with releases (the recipe's ``release`` section, ``audit chain --release``) gets one more row per release,
``<run> release:q4_0``, whose columns are the release's numbers under the tuned model's keys
(``exposure.mean/rep_16/release:q4_0`` in the ``exposure 16x`` column, ``mia.auc/loss_diff/release:q4_0`` in ``MIA AUC``);
what a release has no number of (training loss, wall time) is ``n/a``.

An experiment name lists the audits in it, one row each; the nested stage runs (inject, score_base, train, ...) are
not audits and are left out. Rows are named so that two runs of one recipe differ: the run directory's name, or the
MLflow run name with its start time and id. Metrics come from MLflow under the same stable keys as ``report.json``;
a run directory that was not tracked (``--no-tracking``) is read from its report instead, and the table says so.
A sqlite store that does not exist is an error, never a new empty ``mlflow.db``. The plot is a PNG drawn with
matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit.core.errors import AuditError, did_you_mean
from audit.core.gates import NULL_MEAN_EXPOSURE_BITS
from audit.core.layout import LAYOUT

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
RELEASE_LABEL = re.compile(r"/(release:[a-z0-9_]+)$")
"""The model label a release's metric keys end in (:mod:`audit.pipeline.release`)."""
STAGE_TAG = "canary_audit.stage"
"""Tag of the nested stage runs (audit.report.tracking.STAGE_TAG): not audits, so never compare rows."""
MIA_KEY = "mia.auc/loss_diff"
WORKS_COLUMNS = {"works extractable member": "works.extractable_share/member/{model}",
                 "works extractable held-out": "works.extractable_share/held_out/{model}",
                 "works stored bits member": "works.stored_bits/member"}
"""Whole-work columns (``works`` recipe section), shown when a run has them."""
EPS_KEY = "privacy.eps_lb"


@dataclass
class CompareRow:
    """One run's identity and flat metrics (``exposure.mean/rep_16/tuned`` ...)."""

    label: str
    run_id: str | None
    recipe: str
    method: str
    model: str
    metrics: dict[str, float] = field(default_factory=dict)
    source: str = "mlflow"
    """``mlflow`` or ``report.json`` (an untracked run directory)."""
    data: str = "?"
    """The training data: corpus source and canary spec."""

    def tiers(self, model: str = "tuned") -> list[int]:
        found = set()
        for key in self.metrics:
            m = re.fullmatch(rf"exposure\.mean/rep_(\d+)/{re.escape(model)}", key)
            if m:
                found.add(int(m.group(1)))
        return sorted(found)

    def exposure(self, reps: int, model: str = "tuned") -> float | None:
        """Headline exposure: bits against the sampled references (``exposure.mean``), as in the table and the gates."""
        return self.metrics.get(f"exposure.mean/rep_{reps}/{model}")

    def space_exposure(self, reps: int, model: str = "tuned") -> float | None:
        """Whole-space exposure (``exposure.space_mean``): labelled as such wherever it is shown."""
        return self.metrics.get(f"exposure.space_mean/rep_{reps}/{model}")

    def get(self, key: str | None) -> float | None:
        return None if key is None else self.metrics.get(key)


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _data_label(corpus: str | None, spec: str | None) -> str:
    return f"{corpus or '?'} + {spec or '?'} canaries"


def _row_from_mlflow(run: Any) -> CompareRow:
    from datetime import UTC, datetime

    params, tags = run.data.params, run.data.tags
    started = datetime.fromtimestamp(run.info.start_time / 1000, UTC).strftime("%m-%d %H:%M") if run.info.start_time else "?"
    name = run.info.run_name or tags.get("canary_audit.recipe", "run")
    return CompareRow(label=f"{name} {started} {run.info.run_id[:6]}", run_id=run.info.run_id,
                      recipe=tags.get("canary_audit.recipe", params.get("name", "?")), method=params.get("training.method", "?"),
                      model=params.get("model.source", "?"), metrics=dict(run.data.metrics),
                      data=_data_label(params.get("corpus.source"), params.get("canaries.spec")))


def _row_from_report(report: Any, run_dir: Path) -> CompareRow:
    from audit.core.gates import report_metrics

    metrics = {k: v.value for k, v in report_metrics(report).items() if v.value is not None}
    metrics.setdefault("train.final_loss", report.training.final_loss or float("nan"))
    for key, value in report.timings_s.items():
        metrics.setdefault(f"time.{key}_s", value)
    return CompareRow(label=run_dir.name, run_id=None, recipe=report.recipe.get("name", "?"), method=report.training.method,
                      model=report.model.source, metrics=metrics, source=LAYOUT.report,
                      data=_data_label((report.recipe.get("corpus") or {}).get("source"), report.canaries.spec))


def release_rows(row: CompareRow) -> list[CompareRow]:
    """One row per release of ``row``'s run: each tuned-model key (``.../tuned``, or a key with no model such as
    ``mia.auc/loss_diff``) filled from the release's key of the same name (``.../release:q4_0``,
    ``mia.auc/loss_diff/release:q4_0``), so the table's columns read the release where they read the tuned model."""
    labels = sorted({m.group(1) for key in row.metrics if (m := RELEASE_LABEL.search(key))})
    tuned = [key for key in row.metrics if not RELEASE_LABEL.search(key) and not key.endswith("/base")]
    out = []
    for label in labels:
        own = {key: row.metrics[theirs] for key in tuned
               if (theirs := key.removesuffix("/tuned") + f"/{label}") in row.metrics}
        out.append(CompareRow(label=f"{row.label} {label}", run_id=row.run_id, recipe=row.recipe, method=row.method,
                              model=row.model, metrics=own, source=row.source, data=row.data))
    return out


def check_store_exists(uri: str, *, where: str = "") -> None:
    """A sqlite store must exist: MLflow would otherwise create an empty ``mlflow.db`` and report nothing in it."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise AuditError(f"no MLflow store at {path}{where}",
                             fix="run `audit compare` from the directory where the audits ran, or pass --tracking-uri "
                                 "sqlite:///PATH/mlflow.db (or give run directories)")


def resolve_rows(targets: list[str], *, tracking_uri: str | None = None, releases: bool = True) -> list[CompareRow]:
    """Each target is a run directory (or its report.json), an MLflow run id, or an experiment name; ``releases``:
    each run followed by its releases' rows (:func:`release_rows`)."""
    from audit.report.tracking import resolve_tracking_uri

    if not targets:
        raise AuditError("audit compare needs at least one run", fix="give run directories, MLflow run ids or an experiment name")
    default_uri = resolve_tracking_uri(tracking_uri)
    rows: list[CompareRow] = []
    for target in targets:
        path = Path(target)
        if path.exists():
            rows.append(_row_from_path(path, tracking_uri))
        elif RUN_ID.match(target):
            check_store_exists(default_uri)
            rows.append(_row_from_run_id(target, default_uri))
        else:
            check_store_exists(default_uri, where=f" (and '{target}' is not a run directory)")
            rows.extend(_rows_from_experiment(target, default_uri))
    return [r for row in rows for r in [row, *(release_rows(row) if releases else [])]]


def _row_from_path(path: Path, tracking_uri: str | None) -> CompareRow:
    from audit.core.gates import read_report_or_run

    report = read_report_or_run(path)
    run_dir = path if path.is_dir() else path.parent
    if report.tracking is None:
        return _row_from_report(report, run_dir)
    uri = tracking_uri or report.tracking.uri
    check_store_exists(uri, where=f" (where {run_dir} was logged)")
    try:
        run = _client(uri).get_run(report.tracking.run_id)
    except Exception as exc:  # noqa: BLE001 - any MLflow lookup failure means the same thing here
        raise AuditError(f"MLflow run {report.tracking.run_id} of {run_dir} is not in {uri} ({type(exc).__name__})",
                         fix="pass --tracking-uri where the run was logged") from None
    row = _row_from_mlflow(run)
    row.label = run_dir.name
    row.data = _data_label((report.recipe.get("corpus") or {}).get("source"), report.canaries.spec)
    return row


def _row_from_run_id(run_id: str, uri: str) -> CompareRow:
    try:
        run = _client(uri).get_run(run_id)
    except Exception:  # noqa: BLE001
        raise AuditError(f"no MLflow run {run_id} in {uri}", fix="check the id, or pass --tracking-uri") from None
    return _row_from_mlflow(run)


def _rows_from_experiment(name: str, uri: str) -> list[CompareRow]:
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise AuditError(f"'{name}' is not a run directory, an MLflow run id or an experiment in {uri}."
                         + did_you_mean(name, names),
                         fix=f"experiments there: {', '.join(names) or 'none'}")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"])
    audits = [r for r in runs if STAGE_TAG not in r.data.tags]  # nested stage runs are parts of an audit, not audits
    if not audits:
        raise AuditError(f"experiment '{name}' has no finished audit runs", fix="run an audit first")
    return [_row_from_mlflow(r) for r in audits]


# --------------------------------------------------------------------------------------------------- table


def _fmt(value: float | None, fmt: str = ".2f") -> str:
    return "n/a" if value is None or value != value else format(value, fmt)


def model_free_key(key: str, model: str) -> str | None:
    """The key of a tuned-model number that names no model (``mia.auc/loss_diff``) for ``model``: itself for the
    tuned model, ``.../release:q4_0`` for a release, None for the base model (which has no such number)."""
    if model == "tuned":
        return key
    return f"{key}/{model}" if RELEASE_LABEL.search(f"/{model}") else None


def compare_table(rows: list[CompareRow], *, model: str = "tuned") -> str:
    """A Markdown table, one row per run (pastes into a README as it is)."""
    tiers = sorted({t for r in rows for t in r.tiers(model)})
    members = [t for t in tiers if t > 0]
    top = max(members, default=None)
    space = top is not None and any(r.space_exposure(top, model) is not None for r in rows)
    works = any(r.get(key.format(model=model)) is not None for r in rows for key in WORKS_COLUMNS.values())
    header = (["run", "data", "method", "model"] + [f"exposure {'refs' if t == 0 else f'{t}x'}" for t in tiers]
              + ([f"whole-space exposure {top}x"] if space else [])
              + [f"extracted {t}x" for t in members] + ["MIA AUC", "eps LB"]
              + (list(WORKS_COLUMNS) if works else []) + ["final loss", "train s", "total s"])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [r.label + (" (report.json)" if r.source != "mlflow" else ""), r.data, r.method, r.model]
        cells += [_fmt(r.exposure(t, model)) for t in tiers]
        if space:
            cells.append(_fmt(r.space_exposure(top, model)))
        cells += [_fmt(r.get(f"extraction.exact/rep_{t}/{model}"), ".0f") for t in members]
        cells += [_fmt(r.get(model_free_key(MIA_KEY, model))), _fmt(r.get(model_free_key(EPS_KEY, model)))]
        cells += [_fmt(r.get(key.format(model=model)), ".1f" if "bits" in key else ".2f")
                  for key in WORKS_COLUMNS.values()] if works else []
        cells += [_fmt(r.get("train.final_loss"), ".3f"), _fmt(r.get("time.train_s"), ".0f"), _fmt(r.get("time.total_s"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"exposure = bits of the {model} model against the sampled references (exposure.mean: the scale of "
                 f"`audit run`'s table and the gates; max log2(references + 1); an unlearned canary averages "
                 f"~{NULL_MEAN_EXPOSURE_BITS:.2f})"
                 + ("; whole-space exposure = rank over the whole secret space (exposure.space_mean), a second scale, "
                    "not capped" if space else "")
                 + "; extracted = canaries greedy decoding reproduced; MIA AUC = loss_diff attack, members vs references; "
                   "eps LB = one-run epsilon lower bound"
                 + ("; works = whole works (docs/works.md): mean share of (n, p)-extractable windows of member and "
                    "held-out works, mean stored bits (base - tuned) of a member work" if works else ""))
    return "\n".join(lines)


def plot_labels(labels: list[str], *, width: int = 22) -> list[str]:
    """Labels that still tell runs apart on an axis: the part after their common prefix, on a second line.

    ``tiny-lora-cpu-20261201-080536-5f9fd0`` and ``tiny-lora-cpu-20261201-081002-aa11bb`` become
    ``tiny-lora-cpu-20261201-\n080536-5f9fd0`` and ``...\n081002-aa11bb``: cutting both at 24 characters would show
    the same text twice.
    """
    if len(set(labels)) < len(labels):
        labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    if all(len(label) <= width for label in labels):
        return labels
    if len(labels) < 2:
        return [label[:width] + "\n" + label[width:] for label in labels]
    common = len(os.path.commonprefix(labels))
    cut = max((labels[0].rfind(sep, 0, common) + 1 for sep in "-_ /"), default=0)
    out = []
    for label in labels:
        head, tail = label[:cut], label[cut:]
        head = head if len(head) <= width else head[: width - 1] + "\u2026"
        tail = tail if len(tail) <= width else "\u2026" + tail[-(width - 1):]
        out.append(f"{head}\n{tail}" if head else tail)
    return out


def _floor_zero_axis(ax: Any, values: list[float]) -> None:
    """Counts and times start at 0; an all-zero panel gets 0..1, not matplotlib's -0.04..0.04."""
    top = max((v for v in values if v == v), default=0.0)
    ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)


# --------------------------------------------------------------------------------------------------- plot


def compare_plot(rows: list[CompareRow], path: Path, *, model: str = "tuned") -> Path:
    """Write :func:`compare_figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = compare_figure(rows, model=model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare_figure(rows: list[CompareRow], *, model: str = "tuned") -> Any:
    """Six panels: exposure and extraction by tier, MIA AUC, epsilon lower bound, final loss, wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tiers = sorted({t for r in rows for t in r.tiers(model)})
    members = [t for t in tiers if t > 0]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(tiers))
    ax = axes[0, 0]
    for i, r in enumerate(rows):
        ax.bar(x + i * width, [r.exposure(t, model) or 0.0 for t in tiers], width, label=r.label)
    ax.axhline(1 / np.log(2), color="grey", linestyle="--", linewidth=1, label="null (1/ln 2)")
    ax.set_xticks(x + width * (len(rows) - 1) / 2, ["refs" if t == 0 else f"{t}x" for t in tiers])
    ax.set_title("exposure by repetition tier (bits vs sampled references)")
    _floor_zero_axis(ax, [r.exposure(t, model) or 0.0 for r in rows for t in tiers] + [1 / np.log(2)])
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    xm = np.arange(len(members))
    for i, r in enumerate(rows):
        ax.bar(xm + i * width, [r.get(f"extraction.exact/rep_{t}/{model}") or 0.0 for t in members], width, label=r.label)
    ax.set_xticks(xm + width * (len(rows) - 1) / 2, [f"{t}x" for t in members])
    ax.set_title("canaries extracted (greedy)")
    _floor_zero_axis(ax, [r.get(f"extraction.exact/rep_{t}/{model}") or 0.0 for r in rows for t in members])
    mia, eps = model_free_key(MIA_KEY, model), model_free_key(EPS_KEY, model)
    for ax, key, title in ((axes[0, 2], mia, "membership AUC (loss_diff)"), (axes[1, 0], eps, "epsilon lower bound"),
                           (axes[1, 1], "train.final_loss", "final train loss"), (axes[1, 2], "time.total_s", "wall time (s)")):
        values = [r.get(key) for r in rows]
        pos = np.arange(len(rows))
        ax.bar(pos, [v if v is not None else 0.0 for v in values], color=[f"C{i}" for i in range(len(rows))])
        for p, v in zip(pos, values, strict=True):
            ax.text(p, v if v is not None and v == v else 0.0, "n/a" if v is None else f"{v:.3g}",
                    ha="center", va="bottom", fontsize=8)
        ax.set_xticks(pos, plot_labels([r.label for r in rows]), fontsize=7)
        ax.set_title(title)
        if key != MIA_KEY:
            _floor_zero_axis(ax, [v for v in values if v is not None])
        else:
            ax.set_ylim(0, 1.05)
    fig.suptitle(f"canary-audit compare: {len(rows)} audit{'s' if len(rows) != 1 else ''} ({model} model)")
    fig.tight_layout()
    return fig
