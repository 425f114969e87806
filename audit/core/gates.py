"""Release gates: pure pass/fail decisions over a report's flat metrics.

    audit gate runs/<run>                                  # the recipe's own gates; exit 1 if any fails
    audit gate runs/<run> --gates my_gates.yaml --baseline runs/<last-release> --junit gates.xml

A gate names a metric key, optional filters, and thresholds::

    gates:
      - name: single-copy secrets stay near the null
        metric: exposure.mean/rep_1/tuned       # a key, a glob (exposure.mean/*/tuned) or a family (exposure.mean)
        max: 4.8                                # fail above; `min` fails below
      - metric: extraction.exact
        model: tuned                            # filters: tier, model, kind, work (path segments of the key)
        max: 0
      - metric: exposure.mean/rep_16/tuned
        tolerance: 0.5                          # with --baseline: fail if worse than the baseline by more than this
        worse: higher
      - metric: exposure.mean/rep_4/tuned
        of: max                                 # the maximum over the memorization curve (report.curves)
        max: 6
      - metric: exposure.mean/rep_16/tuned
        of: first_step_above                    # the step at which the curve first exceeds threshold
        threshold: 5
        min: 40                                 # fail if the 16-copy canaries are exposed before step 40

Every key a gate matches is checked on its own and gets a row. A gate that matches nothing fails (a renamed
metric must not turn a gate green), a NaN fails, and a tolerance without a baseline is skipped, never passed.

Thresholds sit against the null, not against 0: a canary the model never learned has a uniform rank among the
references, so its exposure is about Exp(1) in nats and averages 1/ln 2 = 1.44 bits (Carlini et al. 2019,
"The Secret Sharer", section 4). :func:`exposure_null_tail` gives the chance that ``n`` unlearned canaries
average at least a threshold, i.e. a gate's false-alarm rate on a model that memorized nothing.

Pure: pydantic and the standard library only, no torch, so a CI job can gate a report made on a GPU machine.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from audit.core.console import text_table
from audit.core.errors import AuditError, did_you_mean
from audit.core.layout import LAYOUT
from audit.core.schema import SCHEMA_VERSION, AuditReport, GateResult, GateSpec, MetricEntry

NULL_MEAN_EXPOSURE_BITS = 1 / math.log(2)
"""Mean exposure of a canary the model never saw: its rank among the references is uniform, so its exposure in nats
is ~Exp(1), whose mean is 1 nat = 1/ln 2 = 1.44 bits (the limit of :func:`audit.metrics.null_exposure_mean` as the
space grows). The one copy of this constant: the report, the gate table, validate and the human report read it here
(this module stays standard-library only, so a CI job can gate without numpy)."""

_FILTER_PREFIXES = {"tier": "rep", "model": None, "kind": "kind", "work": "work"}


# --------------------------------------------------------------------------------------------------- metrics


def report_metrics(report: AuditReport) -> dict[str, MetricEntry]:
    """The report's metrics as one flat dict of stable keys (:meth:`AuditReport.flat_metrics`: the keys MLflow gets),
    in natural order (``rep_4`` before ``rep_16``)."""
    flat = report.flat_metrics()
    return {key: flat[key] for key in sorted(flat, key=natural_key)}


def exposure_null_tail(mean_bits: float, n: int) -> float:
    """P(mean exposure of ``n`` unlearned canaries >= ``mean_bits``): the false-alarm rate of a ``max`` gate.

    Under the null a canary's rank among the references is uniform, so P(exposure >= e) ~= 2^-e: exposure in nats
    is Exp(1) and the sum of ``n`` is Gamma(n, 1). The tail of an integer-shape Gamma is closed form:
    P(S >= x) = e^-x * sum_{k<n} x^k / k!, with x = n * mean_bits * ln 2. The continuous form ignores the cap at
    log2(references + 1), so it slightly overstates the tail near the cap (a conservative false-alarm rate).
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    if mean_bits <= 0:
        return 1.0
    x = n * mean_bits * math.log(2)
    term, total = 1.0, 1.0
    for k in range(1, n):
        term *= x / k
        total += term
    return min(1.0, math.exp(-x) * total)


# --------------------------------------------------------------------------------------------------- matching


def gate_name(spec: GateSpec) -> str:
    if spec.name:
        return spec.name
    filters = [f"{field}={getattr(spec, field)}" for field in _FILTER_PREFIXES if getattr(spec, field) is not None]
    return " ".join([spec.metric, *filters])


def _segment_matches(segments: list[str], field: str, wanted: Any) -> bool:
    prefix = _FILTER_PREFIXES[field]
    accepted = {str(wanted)} | ({f"{prefix}_{wanted}"} if prefix else set())
    if field == "tier":  # a tier is always written rep_<n>; a bare number segment is something else
        accepted = {f"rep_{wanted}"}
    return any(s in accepted for s in segments)


def matching_keys(spec: GateSpec, keys: Iterable[str]) -> list[str]:
    """Keys the gate applies to: equal to, globbed by, or in the family of ``spec.metric``, then filtered."""
    out = []
    for key in keys:
        segments = key.split("/")
        if not (key == spec.metric or fnmatch.fnmatchcase(key, spec.metric) or segments[0] == spec.metric):
            continue
        if all(_segment_matches(segments[1:], field, getattr(spec, field))
               for field in _FILTER_PREFIXES if getattr(spec, field) is not None):
            out.append(key)
    return sorted(out, key=natural_key)


def natural_key(key: str) -> list[Any]:
    """Sort ``rep_4`` before ``rep_16``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


# --------------------------------------------------------------------------------------------------- evaluation


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.4g}"


def _rule(spec: GateSpec, baseline_value: float | None) -> str:
    parts = []
    if spec.min is not None:
        parts.append(f">= {_num(spec.min)}")
    if spec.max is not None:
        parts.append(f"<= {_num(spec.max)}")
    if spec.tolerance is not None:
        op, sign = ("<=", "+") if spec.direction == "higher" else (">=", "-")
        base = f"baseline {_num(baseline_value)}" if baseline_value is not None else "baseline"
        parts.append(f"{op} {base} {sign} {_num(spec.tolerance)}")
    rule = "; ".join(parts)
    if spec.of == "max":
        return f"max over steps {rule}"
    if spec.of == "first_step_above":
        return f"first step above {_num(spec.threshold)} {rule}"
    return rule


Curve = list[tuple[int, float]]


def curve_of(key: str, metrics: Mapping[str, MetricEntry], curves: Mapping[str, Curve] | None) -> Curve:
    """The key's memorization curve, ``(step, value)`` in step order; without a recorded curve, the final value alone
    (at step ``train.steps``, else 0), so a curve gate on a report without curves reads the one point it has."""
    if curves and curves.get(key):
        return sorted((int(s), float(v)) for s, v in curves[key])
    steps = metrics.get("train.steps")
    return [(int(steps.value) if steps is not None else 0, metrics[key].value)]


def first_step_above(curve: Curve, threshold: float) -> int | None:
    """The first step whose value exceeds ``threshold``; None if the curve never does. NaN points never count."""
    return next((step for step, value in curve if value > threshold), None)


def _read(spec: GateSpec, key: str, metrics: Mapping[str, MetricEntry], curves: Mapping[str, Curve] | None) -> float | None:
    """The number the gate checks for ``key``: the final value, the curve's max, or its first crossing step (None: never)."""
    if spec.of == "final":
        return metrics[key].value
    curve = curve_of(key, metrics, curves)
    if spec.of == "max":
        values = [v for _, v in curve if not math.isnan(v)]
        return max(values) if values else math.nan
    assert spec.threshold is not None  # the schema requires it with first_step_above
    step = first_step_above(curve, spec.threshold)
    return None if step is None else float(step)


def evaluate_gate(spec: GateSpec, metrics: Mapping[str, MetricEntry],
                  baseline: Mapping[str, MetricEntry] | None = None, *,
                  curves: Mapping[str, Curve] | None = None) -> list[GateResult]:
    """Check one gate against every key it matches. Pure: metrics (and the report's curves) in, results out."""
    name = gate_name(spec)
    keys = matching_keys(spec, metrics)
    if not keys:
        filtered = any(getattr(spec, field) is not None for field in _FILTER_PREFIXES)
        reason = f"no metric in the report matches '{spec.metric}'" + (" with those filters" if filtered else "")
        return [GateResult(gate=name, metric=spec.metric, value=None, threshold=_rule(spec, None), status="fail",
                           reason=reason + "." + did_you_mean(spec.metric, metrics))]
    results = []
    for key in keys:
        metric = metrics[key]
        value = _read(spec, key, metrics, curves)
        base_value = baseline[key].value if baseline is not None and key in baseline else None
        failures: list[str] = []
        skipped = ""
        if value is None:  # first_step_above, and the curve never crossed: it stays below for ever
            if spec.max is not None:
                failures.append(f"never above {_num(spec.threshold)}, so no step <= max {_num(spec.max)}")
        elif math.isnan(value):
            failures.append("value is NaN")
        else:
            if spec.max is not None and value > spec.max:
                failures.append(f"{_num(value)} > max {_num(spec.max)}")
            if spec.min is not None and value < spec.min:
                failures.append(f"{_num(value)} < min {_num(spec.min)}")
            if spec.tolerance is not None:
                if baseline is None:
                    skipped = "no baseline given"
                elif base_value is None:
                    failures.append(f"the baseline has no metric '{key}'")
                elif math.isnan(base_value):
                    failures.append("baseline value is NaN")
                elif spec.direction == "higher" and value > base_value + spec.tolerance:
                    failures.append(f"regressed {_num(value - base_value)} above the baseline (tolerance {_num(spec.tolerance)})")
                elif spec.direction == "lower" and value < base_value - spec.tolerance:
                    failures.append(f"regressed {_num(base_value - value)} below the baseline (tolerance {_num(spec.tolerance)})")
        only_tolerance = spec.max is None and spec.min is None
        status = "fail" if failures else ("skip" if skipped and only_tolerance else "pass")
        reason = "; ".join(failures) if failures else (skipped if status == "skip" else "")
        if value is None and status == "pass":
            reason = f"never above {_num(spec.threshold)}"
        results.append(GateResult(gate=name, metric=key, value=value, n=metric.n, threshold=_rule(spec, base_value),
                                  baseline=base_value, status=status, reason=reason))
    return results


def evaluate_gates(specs: Iterable[GateSpec], metrics: Mapping[str, MetricEntry],
                   baseline: Mapping[str, MetricEntry] | None = None, *,
                   curves: Mapping[str, Curve] | None = None) -> list[GateResult]:
    """All gates, in the order given; each matched key is its own result. ``curves``: the report's
    (:attr:`AuditReport.curves`), read by gates with ``of: max`` or ``of: first_step_above``."""
    return [result for spec in specs for result in evaluate_gate(spec, metrics, baseline, curves=curves)]


# --------------------------------------------------------------------------------------------------- output


def format_gate_table(results: list[GateResult], *, only_failed: bool = False) -> str:
    """A fixed-width table: gate, metric, value, threshold, n, result; failure reasons follow the table."""
    shown = [r for r in results if not r.passed] if only_failed else results
    header = ["gate", "metric", "value", "threshold", "n", "result"]
    rows = [[r.gate, r.metric, _num(r.value), r.threshold, "-" if r.n is None else str(r.n), r.status.upper()] for r in shown]
    out = text_table(header, rows)
    for r in shown:
        if r.reason:
            out.append(f"  {r.status.upper()} {r.gate} [{r.metric}]: {r.reason}")
    failed = sum(not r.passed for r in results)
    skipped = sum(r.status == "skip" for r in results)
    out.append(f"{len(results) - failed - skipped} passed, {failed} failed, {skipped} skipped "
               f"(exposure in bits; an unlearned canary averages {NULL_MEAN_EXPOSURE_BITS:.2f})")
    return "\n".join(out)


def junit_xml(results: list[GateResult], *, suite: str = "canary-audit gates") -> str:
    """JUnit XML for CI systems: one test case per gate result, failures carry the rule and the value."""
    root = ET.Element("testsuites")
    failures = sum(r.status == "fail" for r in results)
    skipped = sum(r.status == "skip" for r in results)
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(results)), failures=str(failures),
                       errors="0", skipped=str(skipped))
    for r in results:
        case = ET.SubElement(ts, "testcase", classname="canary_audit.gates", name=f"{r.gate} [{r.metric}]")
        detail = f"value {_num(r.value)}, rule {r.threshold}, n {r.n if r.n is not None else '-'}"
        if r.status == "fail":
            ET.SubElement(case, "failure", message=r.reason, type="GateFailed").text = detail
        elif r.status == "skip":
            ET.SubElement(case, "skipped", message=r.reason)
        else:
            ET.SubElement(case, "system-out").text = detail
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# --------------------------------------------------------------------------------------------------- inputs


def parse_gate_specs(data: Any, *, source: str) -> list[GateSpec]:
    """A list of gate mappings, or a mapping with a ``gates:`` list, validated into :class:`GateSpec`."""
    if isinstance(data, Mapping):
        unknown = [k for k in data if k != "gates"]
        if unknown:
            raise AuditError(f"{source}: unknown key '{unknown[0]}'." + did_you_mean(str(unknown[0]), ["gates"]),
                             fix="a gates file holds a 'gates:' list (or is a bare list of gates)")
        data = data.get("gates")
    if not isinstance(data, list):
        raise AuditError(f"{source}: gates must be a list of mappings, not {type(data).__name__}",
                         fix="write e.g. 'gates: [{metric: exposure.mean/rep_1/tuned, max: 4.8}]'")
    specs = []
    for i, item in enumerate(data):
        try:
            specs.append(GateSpec.model_validate(item))
        except ValidationError as exc:
            raise _explain_gate(exc, f"{source}: gates[{i}]") from None
    return specs


def _explain_gate(exc: ValidationError, where: str) -> AuditError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return AuditError(f"{where}: unknown key '{loc}'." + did_you_mean(loc, GateSpec.model_fields),
                          fix=f"valid keys are: {', '.join(GateSpec.model_fields)}")
    msg = err["msg"].removeprefix("Value error, ")
    shown = "" if isinstance(err.get("input"), dict) else f" (got {err.get('input')!r})"
    field = f"'{loc}': " if loc else ""
    return AuditError(f"{where}: {field}{msg}{shown}", fix="correct that gate")


def load_gate_specs(path: str | Path) -> list[GateSpec]:
    """Read a gates YAML file (see the module docstring)."""
    from audit.core.config import read_yaml

    path = Path(path)
    if path.is_dir():
        raise AuditError(f"gates file {path} is a directory", fix="give the gates YAML file itself (--gates path/to/gates.yaml)")
    if not path.is_file():
        raise AuditError(f"gates file {path} does not exist", fix="check the --gates path")
    return parse_gate_specs(read_yaml(path, mapping=False) if path.stat().st_size else [], source=str(path))


def read_report_or_run(path: str | Path) -> AuditReport:
    """``report.json`` itself or a run directory holding one; a clear error for anything else."""
    path = Path(path)
    file = path / LAYOUT.report if path.is_dir() else path
    if not file.is_file():
        if path.is_dir():
            status = _run_status(path)
            why = f" (run status: {status}; resume it with `audit run --resume {path}`)" if status else ""
            raise AuditError(f"{path} has no {LAYOUT.report}{why}", fix="give a finished run directory or its report.json")
        raise AuditError(f"report {path} does not exist", fix="give a run directory (runs/<name>) or a report.json")
    try:
        text = file.read_text(encoding="utf-8")
        version = _schema_version_of(text)
        if version is not None and version != SCHEMA_VERSION:
            raise AuditError(f"{file} is a report of schema_version {version}; this canary-audit reads version {SCHEMA_VERSION}",
                             fix="read it with the canary-audit version that wrote it (report.json's versions.canary-audit)")
        return AuditReport.model_validate_json(text)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "report"
        raise AuditError(f"{file} is not a canary-audit report: '{where}': {err['msg'].removeprefix('Value error, ')}",
                         fix="give the report.json written by `audit run`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"cannot read {file}: {exc}", fix="check the path and permissions") from None


def _schema_version_of(text: str) -> object | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data.get("schema_version") if isinstance(data, dict) else None


def _run_status(run_dir: Path) -> str | None:
    try:
        return str(json.loads((run_dir / LAYOUT.status).read_text(encoding="utf-8")).get("status"))
    except (OSError, ValueError, AttributeError):
        return None


def recipe_gates(report: AuditReport) -> list[GateSpec]:
    """The gates stored with the report's resolved recipe."""
    return parse_gate_specs(report.recipe.get("gates") or [], source=f"report {report.run_id} recipe")
