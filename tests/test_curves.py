"""Memorization curves: the report's ``curves``, gates that read them (``of: max | first_step_above``), the plot,
and the curve points of the suite. Pure and fast (hand-made reports and scores)."""

from __future__ import annotations

import math

import pytest
from helpers import make_run_dir, synthetic_scores, tier_report

from audit.core.curves import add_point, read_curves, write_curves
from audit.core.errors import AuditError
from audit.core.gates import evaluate_gates, parse_gate_specs, report_metrics
from audit.core.schema import GateSpec, ScoringSection
from audit.report import close_curves, read_report, summarize_tiers, write_report

KEY = "exposure.mean/rep_16/tuned"
CURVE = {KEY: [(25, 1.2), (50, 3.9), (75, 6.5), (100, 5.8)]}


def report_with_curve(final_exposure: float = 5.8, steps: int = 100):
    report = tier_report({0: (6, 1.4, 0), 16: (2, final_exposure, 1)})
    return report.model_copy(update={"training": report.training.model_copy(update={"steps": steps}), "curves": CURVE})


def gates(*specs: dict):
    return parse_gate_specs(list(specs), source="test")


def run(report, *specs: dict):
    return evaluate_gates(gates(*specs), report_metrics(report), curves=report.curves)


def test_a_max_gate_reads_the_curve_peak_not_the_final_value():
    report = report_with_curve()
    [final] = run(report, {"metric": KEY, "max": 6.0})
    [peak] = run(report, {"metric": KEY, "of": "max", "max": 6.0})
    assert final.passed and final.value == 5.8
    assert not peak.passed and peak.value == 6.5 and "6.5 > max 6" in peak.reason
    assert peak.threshold == "max over steps <= 6"


def test_first_step_above_is_the_step_the_tier_first_crosses_the_threshold():
    report = report_with_curve()
    [early] = run(report, {"metric": KEY, "of": "first_step_above", "threshold": 3.0, "min": 60})
    [late] = run(report, {"metric": KEY, "of": "first_step_above", "threshold": 6.0, "min": 60})
    assert early.value == 50 and not early.passed and "50 < min 60" in early.reason
    assert late.value == 75 and late.passed
    assert early.threshold == "first step above 3 >= 60"


def test_a_curve_that_never_crosses_passes_a_min_and_fails_a_max_on_the_crossing_step():
    report = report_with_curve()
    [never_min] = run(report, {"metric": KEY, "of": "first_step_above", "threshold": 7.0, "min": 10})
    [never_max] = run(report, {"metric": KEY, "of": "first_step_above", "threshold": 7.0, "max": 80})
    assert never_min.passed and never_min.value is None and never_min.reason == "never above 7"
    assert not never_max.passed and "never above 7" in never_max.reason


def test_a_curve_gate_on_a_report_without_curves_reads_the_final_point_at_the_last_step():
    report = report_with_curve().model_copy(update={"curves": {}})
    [peak] = run(report, {"metric": KEY, "of": "max", "max": 6.0})
    [cross] = run(report, {"metric": KEY, "of": "first_step_above", "threshold": 5.0, "max": 1000})
    assert peak.value == 5.8 and peak.passed
    assert cross.value == 100 and cross.passed  # the final value at training.steps


def test_a_curve_gate_matching_nothing_still_fails():
    [result] = run(report_with_curve(), {"metric": "exposure.mean/rep_64/tuned", "of": "max", "max": 1.0})
    assert not result.passed and "no metric in the report matches" in result.reason


@pytest.mark.parametrize("spec, message", [
    ({"metric": KEY, "of": "first_step_above", "min": 10}, "'threshold' goes with"),
    ({"metric": KEY, "threshold": 3.0, "min": 10}, "'threshold' goes with"),
    ({"metric": KEY, "of": "max", "tolerance": 0.5, "worse": "higher"}, "a baseline tolerance compares final values"),
    ({"metric": KEY, "of": "peak", "max": 1}, "'of'"),
])
def test_bad_curve_gates_are_one_line_errors_naming_the_gate(spec, message):
    with pytest.raises(AuditError, match=message) as err:
        gates(spec)
    assert "\n" not in str(err.value) and "gates[0]" in str(err.value)


def test_close_curves_ends_each_curve_with_the_final_value_at_the_last_step():
    report = report_with_curve(final_exposure=5.9, steps=100)
    closed = close_curves({KEY: [(25, 1.2), (50, 3.9), (100, 5.0)], "only.live": [(25, 0.3)]}, report)
    assert closed[KEY] == [(25, 1.2), (50, 3.9), (100, 5.9)]  # the point at step 100 is the final audit's value
    assert closed["only.live"] == [(25, 0.3)]  # a key the report lacks keeps its points


def test_add_point_keeps_the_last_measurement_of_a_step():
    curves: dict = {}
    add_point(curves, 10, {KEY: 1.0})
    add_point(curves, 10, {KEY: 2.0})  # on_evaluate and every_steps at the same step
    add_point(curves, 20, {KEY: 3.0})
    assert curves == {KEY: [(10, 2.0), (20, 3.0)]}


def test_curves_round_trip_through_report_json_and_curves_json(tmp_path):
    report = report_with_curve()
    write_report(report, tmp_path / "report.json")
    assert read_report(tmp_path / "report.json").curves == CURVE
    write_curves(tmp_path, CURVE)
    assert read_curves(tmp_path) == CURVE and read_curves(tmp_path / "none") == {}


def test_a_curve_point_has_the_final_reports_tuned_keys_from_the_same_suite():
    from audit.integrations.callback import point_metrics

    scores = synthetic_scores()
    point = point_metrics(scores, ScoringSection(), space_bits=19.93)
    tiers = {k: e.value for t in summarize_tiers(scores) for k, e in t.flat_metrics().items()}
    assert point["exposure.mean/rep_16/tuned"] == tiers["exposure.mean/rep_16/tuned"]
    assert point["extraction.exact/rep_16/tuned"] == tiers["extraction.exact/rep_16/tuned"]
    assert "mia.auc/loss_diff" in point and "exposure.space_mean/rep_16/tuned" in point
    assert not any(k.endswith("/base") for k in point) and not any(math.isnan(v) for v in point.values())


def test_a_curve_point_withholds_a_difference_to_base_over_too_few_secrets():
    """Points reach MLflow while training: memorized bits (base - tuned) beside tuned bits give the base value back,
    so they go only where the tier is large enough (audit.metrics.disclosure)."""
    from audit.integrations.callback import point_metrics
    from audit.metrics.disclosure import min_group

    scores = synthetic_scores()
    sizes = {s.repetitions: sum(1 for r in scores if r.repetitions == s.repetitions and r.model == "tuned") for s in scores}
    small = [r for r, n in sizes.items() if r > 0 and n < min_group(19.93)]
    large = [r for r, n in sizes.items() if r > 0 and n >= min_group(2.0 ** 20)]
    assert small and large
    assert not any(f"information.memorized_bits/rep_{r}" in point_metrics(scores, ScoringSection(), space_bits=19.93)
                   for r in small)
    assert all(f"information.memorized_bits/rep_{r}" in point_metrics(scores, ScoringSection(), space_bits=2.0 ** 20)
               for r in large)


def test_the_report_plots_the_curve_and_tables_it_by_step(tmp_path):
    from audit.report.render import render_report

    run_dir, report = make_run_dir(tmp_path / "run")
    curves = {KEY: [(25, 1.2), (50, 3.9), (100, 6.5)], "exposure.mean/rep_1/tuned": [(25, 1.0), (50, 1.3), (100, 1.5)],
              "mia.auc/loss_diff": [(25, 0.55), (50, 0.7), (100, 0.9)],
              "extraction.exact/rep_16/tuned": [(25, 0), (50, 0), (100, 1)]}
    write_report(report.model_copy(update={"curves": curves}), run_dir / "report.json")
    rendered = render_report(run_dir)
    html, md = rendered.html.read_text(), rendered.markdown.read_text()
    assert '<section id="curves">' in html
    assert html.index('<section id="exposure">') < html.index('<section id="curves">') < html.index('<section id="mia">')
    assert "curves.png" in {p.name for p in rendered.plots} and (run_dir / "plots" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Memorization over training" in md and "step 50" in md


def test_a_report_without_curves_has_no_curve_section(tmp_path):
    from audit.report.render import render_report

    run_dir, _ = make_run_dir(tmp_path / "run")
    assert '<section id="curves">' not in render_report(run_dir).html.read_text()


def test_scoring_every_steps_is_off_by_default_and_never_negative():
    assert ScoringSection().every_steps == 0
    with pytest.raises(ValueError):
        ScoringSection(every_steps=-1)


def test_gate_spec_defaults_to_the_final_value():
    assert GateSpec(metric=KEY, max=1).of == "final"


def test_validate_does_not_range_check_the_step_bounds_of_a_first_crossing_gate():
    from audit.core.config import load_recipe
    from audit.data.validate import check_gates

    recipe = load_recipe("tiny/lora_cpu",
                         ["gates=[{metric: exposure.mean/rep_16/tuned, of: first_step_above, threshold: 5, min: 40}]"])
    check_gates(recipe)  # min 40 is a step: exposure itself never exceeds 8 bits here, and that must not refuse it
    too_high = load_recipe("tiny/lora_cpu", ["gates=[{metric: exposure.mean/rep_16/tuned, of: max, min: 40}]"])
    with pytest.raises(AuditError, match="no run can pass"):
        check_gates(too_high)  # of: max reads exposure values: the range check still applies
