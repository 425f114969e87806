"""Gates: pure pass/fail rules over flat metrics, the `audit gate` command, JUnit output, and the null they sit on."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from helpers import tier_report

from audit.cli import main
from audit.core.config import load_recipe, shipped_recipes
from audit.core.errors import AuditError
from audit.core.gates import (
    evaluate_gates,
    exposure_null_tail,
    format_gate_table,
    junit_xml,
    parse_gate_specs,
    report_metrics,
)
from audit.core.schema import (
    GateSpec,
    MetricEntry,
)


def metric(value: float, n: int | None = None) -> MetricEntry:
    """A flat metric as gates take it (:class:`audit.core.schema.MetricEntry`)."""
    return MetricEntry(value=value, n=n)


METRICS = report_metrics(tier_report({0: (6, 1.5, 0), 1: (2, 2.0, 0), 4: (2, 5.5, 1), 16: (2, 8.0, 2)}))


def gate(**kw) -> GateSpec:
    return GateSpec(**kw)


def test_report_metrics_are_the_mlflow_keys_with_the_tier_size():
    assert METRICS["exposure.mean/rep_16/tuned"] == metric(8.0, 2)
    assert METRICS["extraction.exact/rep_4/tuned"] == metric(1.0, 2)
    assert METRICS["exposure.mean/rep_0/base"] == metric(1.44, 6)
    # natural order: rep_4 before rep_16
    keys = [k for k in METRICS if k.startswith("exposure.mean/") and k.endswith("/tuned")]
    assert keys == [f"exposure.mean/rep_{r}/tuned" for r in (0, 1, 4, 16)]


def test_gates_see_every_metric_the_report_exposes():
    """Metrics added by other stages (membership inference, privacy bounds) are gateable by their keys, with n."""
    from audit.core.schema import MetricEntry

    report = tier_report({1: (2, 2.0, 0)}).model_copy(update={"metrics": {
        "mia.auc/loss_diff": MetricEntry(value=0.71, n=14, low=0.5, high=0.9), "privacy.eps_lb": MetricEntry(value=0.3)}})
    metrics = report_metrics(report)
    assert metrics["mia.auc/loss_diff"] == MetricEntry(value=0.71, n=14, low=0.5, high=0.9)  # interval kept
    assert metrics["privacy.eps_lb"] == metric(0.3, None)
    assert metrics["exposure.mean/rep_1/tuned"] == metric(2.0, 2)
    auc, eps = evaluate_gates([gate(metric="mia.auc/*", max=0.6), gate(metric="privacy.eps_lb", max=1.0)], metrics)
    assert (auc.status, auc.n, eps.status) == ("fail", 14, "pass")


def test_gates_mlflow_and_compare_flatten_a_report_the_same_way():
    """works.bits, train.* and time.* reached MLflow but could not be gated; now one flattener serves all three."""
    from audit.core.schema import MetricEntry
    from audit.report.tracking import report_metric_dict

    report = tier_report({1: (2, 2.0, 0)}).model_copy(update={
        "metrics": {"works.bits/synthetic/member/tuned": MetricEntry(value=12.5, n=4)}, "timings_s": {"train": 3.0}})
    metrics = report_metrics(report)
    assert report_metric_dict(report) == {key: entry.value for key, entry in metrics.items()}
    assert {"works.bits/synthetic/member/tuned", "train.steps", "time.train_s"} <= set(metrics)
    (bits,) = evaluate_gates([gate(metric="works.bits", model="tuned", max=10.0)], metrics)
    assert (bits.status, bits.value, bits.n) == ("fail", 12.5, 4)


def test_max_and_min_thresholds_include_the_boundary():
    results = evaluate_gates([gate(metric="exposure.mean/rep_16/tuned", max=8.0),
                              gate(metric="exposure.mean/rep_16/tuned", max=7.99),
                              gate(metric="exposure.mean/rep_1/tuned", min=2.0),
                              gate(metric="exposure.mean/rep_1/tuned", min=2.01)], METRICS)
    assert [r.status for r in results] == ["pass", "fail", "pass", "fail"]
    assert results[1].reason == "8 > max 7.99" and results[1].n == 2
    assert results[3].reason == "2 < min 2.01"


def test_family_with_filters_checks_every_matching_key():
    results = evaluate_gates([gate(metric="extraction.exact", model="tuned", max=0)], METRICS)
    assert [r.metric for r in results] == [f"extraction.exact/rep_{t}/tuned" for t in (0, 1, 4, 16)]
    assert [r.status for r in results] == ["pass", "pass", "fail", "fail"]
    (one,) = evaluate_gates([gate(metric="exposure.mean", tier=4, model="tuned", max=9)], METRICS)
    assert one.metric == "exposure.mean/rep_4/tuned" and one.value == 5.5


def test_glob_pattern():
    results = evaluate_gates([gate(metric="exposure.mean/*/base", max=2)], METRICS)
    assert len(results) == 4 and all(r.passed for r in results)


def test_tier_filter_does_not_match_a_longer_number():
    """tier=1 must not pick up rep_16."""
    results = evaluate_gates([gate(metric="exposure.mean", tier=1, max=100)], METRICS)
    assert {r.metric for r in results} == {"exposure.mean/rep_1/base", "exposure.mean/rep_1/tuned"}


def test_a_gate_that_matches_nothing_fails_with_a_suggestion():
    (r,) = evaluate_gates([gate(metric="exposure.maen/rep_1/tuned", max=3)], METRICS)
    assert r.status == "fail" and r.value is None
    assert "no metric in the report matches" in r.reason and "Did you mean 'exposure.mean/rep_1/tuned'?" in r.reason


def test_nan_fails_every_rule():
    metrics = {"mia.auc": metric(math.nan, 12)}
    results = evaluate_gates([gate(metric="mia.auc", max=0.6), gate(metric="mia.auc", min=0.4)], metrics)
    assert [r.reason for r in results] == ["value is NaN", "value is NaN"]


def test_tolerance_against_a_baseline():
    spec_up = gate(metric="exposure.mean/rep_4/tuned", tolerance=0.5, worse="higher")
    spec_down = gate(metric="exposure.mean/rep_16/tuned", tolerance=0.5, worse="lower")
    (skip,) = evaluate_gates([spec_up], METRICS)
    assert skip.status == "skip" and skip.reason == "no baseline given"
    baseline = dict(METRICS) | {"exposure.mean/rep_4/tuned": metric(4.9, 2), "exposure.mean/rep_16/tuned": metric(8.6, 2)}
    up, down = evaluate_gates([spec_up, spec_down], METRICS, baseline)
    assert up.status == "fail" and "regressed 0.6 above the baseline" in up.reason and up.baseline == 4.9
    assert down.status == "fail" and "regressed 0.6 below the baseline" in down.reason
    ok = dict(METRICS) | {"exposure.mean/rep_4/tuned": metric(5.0, 2)}
    (passed,) = evaluate_gates([spec_up], METRICS, ok)
    assert passed.status == "pass" and passed.threshold == "<= baseline 5 + 0.5"
    (missing,) = evaluate_gates([spec_up], METRICS, {})
    assert missing.status == "fail" and "the baseline has no metric" in missing.reason


def test_tolerance_direction_is_inferred_from_max_or_min():
    assert gate(metric="m", max=1, tolerance=0.1).direction == "higher"
    assert gate(metric="m", min=1, tolerance=0.1).direction == "lower"


@pytest.mark.parametrize(("data", "message"), [
    ([{"metric": "x"}], "needs a threshold: set max, min or tolerance"),
    ([{"metric": "x", "max": 1, "min": 2}], "min 2.0 above max 1.0"),
    ([{"metric": "x", "maxx": 1}], "unknown key 'maxx'. Did you mean 'max'?"),
    ([{"metric": "x", "max": "high"}], "'max': Input should be a valid number"),
    ([{"metric": "x", "min": 0, "max": 1, "tolerance": 1}], "has a tolerance but no direction"),
    ({"gate": []}, "unknown key 'gate'. Did you mean 'gates'?"),
    ("exposure", "gates must be a list of mappings, not str"),
])
def test_bad_gate_specs_are_one_line_errors(data, message):
    with pytest.raises(AuditError) as info:
        parse_gate_specs(data, source="g.yaml")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_table_and_junit_carry_every_result():
    results = evaluate_gates([gate(name="no extraction", metric="extraction.exact", model="tuned", max=0),
                              gate(metric="exposure.mean/rep_1/tuned", max=4.8)], METRICS)
    table = format_gate_table(results)
    assert table.splitlines()[0].split() == ["gate", "metric", "value", "threshold", "n", "result"]
    assert "3 passed, 2 failed, 0 skipped" in table
    failed_only = format_gate_table(results, only_failed=True)
    assert "exposure.mean/rep_1/tuned" not in failed_only.split("\n\n")[0].splitlines()[2:4]
    assert failed_only.count("FAIL") == 4  # two rows + two reasons
    suite = ET.fromstring(junit_xml(results)).find("testsuite")
    assert suite.get("tests") == "5" and suite.get("failures") == "2"
    assert [c.find("failure") is not None for c in suite.iter("testcase")] == [False, False, True, True, False]


# --------------------------------------------------------------------------------------------------- the null


def test_null_tail_for_one_canary_is_two_to_the_minus_threshold():
    for t in (0.5, 1.0, 3.0, 7.0):
        assert exposure_null_tail(t, 1) == pytest.approx(2.0 ** -t)
    assert exposure_null_tail(0.0, 3) == 1.0


def test_null_tail_matches_simulated_unlearned_canaries():
    """Simulate the null exactly as scoring does it: rank uniform among 256 (255 references + the canary)."""
    rng = np.random.default_rng(0)
    n, m, trials = 2, 256, 200_000
    ranks = rng.integers(1, m + 1, size=(trials, n))
    means = (np.log2(m) - np.log2(ranks)).mean(axis=1)
    assert means.mean() == pytest.approx(1 / math.log(2), abs=0.03)  # ~1.44 bits, not 0
    for threshold in (2.0, 3.0, 4.0):
        simulated = float((means >= threshold).mean())
        assert exposure_null_tail(threshold, n) == pytest.approx(simulated, rel=0.15, abs=0.002)


@pytest.mark.parametrize("name", [n for n in shipped_recipes() if load_recipe(n).gates])
def test_shipped_exposure_gates_rarely_fire_on_a_model_that_learned_nothing(name):
    """Default max gates sit against the null: an unlearned model trips each with probability under 1%."""
    recipe = load_recipe(name)
    from audit.data.canaries import load_spec

    spec = load_spec(recipe.canaries.spec)
    members = recipe.canaries.members_per_tier or spec.members_per_tier
    references = recipe.canaries.references or spec.references
    if recipe.scoring.exposure_null_references is not None:  # only the null sample of the references is ranked
        references = min(references, recipe.scoring.exposure_null_references)
    checked = 0
    for g in recipe.gates:
        if g.max is not None and g.metric.startswith("exposure.mean/rep_"):
            tier = int(g.metric.split("/")[1].removeprefix("rep_"))
            n = references if tier == 0 else members
            assert g.max > 1 / math.log(2), f"{name}: {g.metric} max {g.max} sits below the null mean 1.44"
            assert exposure_null_tail(g.max, n) < 0.01, f"{name}: {g.metric} max {g.max} fires too often under the null"
            # and simulated as scoring does it: each canary's rank uniform among the recipe's references + 1
            m = recipe.scoring.exposure_references + 1
            ranks = np.random.default_rng(tier).integers(1, m + 1, size=(100_000, n))
            fired = int(((np.log2(m) - np.log2(ranks)).mean(axis=1) > g.max).sum())
            assert fired < 1_000, f"{name}: {g.metric} max {g.max} fired {fired} times in 100,000 unlearned draws of {n}"
            checked += 1
    assert checked, f"{name} has gates but none on exposure"


# --------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def report_dir(tmp_path):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    gates = [{"name": "single copies near the null", "metric": "exposure.mean/rep_1/tuned", "max": 4.8}]
    report = tier_report({0: (6, 1.5, 0), 1: (2, 2.0, 0), 16: (2, 8.0, 2)}, gates=gates)
    (run / "report.json").write_text(report.model_dump_json())
    return run


def test_audit_gate_uses_the_recipe_gates_and_exits_0(report_dir, capsys):
    assert main(["gate", str(report_dir)]) == 0
    out = capsys.readouterr().out
    assert "single copies near the null" in out and "PASS" in out and "1 passed, 0 failed" in out


def test_audit_gate_exits_1_on_failure_and_writes_junit(report_dir, tmp_path, capsys):
    gates = tmp_path / "g.yaml"
    gates.write_text("gates:\n  - {metric: extraction.exact, model: tuned, max: 0}\n")
    junit = tmp_path / "out" / "gates.xml"
    assert main(["gate", str(report_dir / "report.json"), "--gates", str(gates), "--junit", str(junit)]) == 1
    out = capsys.readouterr().out
    assert "FAIL extraction.exact model=tuned [extraction.exact/rep_16/tuned]: 2 > max 0" in out
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("failures") == "1" and suite.get("tests") == "3"


def test_audit_gate_with_a_baseline(report_dir, tmp_path, capsys):
    base = tmp_path / "base"
    base.mkdir()
    (base / "report.json").write_text(tier_report({1: (2, 1.0, 0), 16: (2, 8.0, 0)}, run_id="base").model_dump_json())
    gates = tmp_path / "g.yaml"
    gates.write_text("- {metric: exposure.mean/rep_1/tuned, tolerance: 0.5, worse: higher}\n"
                     "- {metric: exposure.mean/rep_16/tuned, tolerance: 0.5, worse: higher}\n")
    assert main(["gate", str(report_dir), "--gates", str(gates), "--baseline", str(base)]) == 1
    out = capsys.readouterr().out
    assert "regressed 1 above the baseline (tolerance 0.5)" in out and "1 passed, 1 failed" in out
