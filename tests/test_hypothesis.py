"""Property-based tests (hypothesis): recipe parsing and validation, and gate evaluation.

Recipes: any override either validates or raises AuditError (never another exception); typed values survive the
YAML round trip that ``recipe.yaml`` and ``audit run --resume`` rely on. Gates: the pass/fail rule is exactly
the threshold comparison, monotone in the threshold, a run never regresses against itself, and a missing
metric or a NaN never passes.
"""

from __future__ import annotations

import math
import string
import xml.etree.ElementTree as ET

import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from audit.core.config import apply_overrides, load_recipe, parse_override, validate_recipe
from audit.core.errors import AuditError
from audit.core.gates import evaluate_gate, evaluate_gates, exposure_null_tail, junit_xml, matching_keys
from audit.core.schema import GateSpec, MetricEntry

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BASE = "tiny/lora_cpu"

# --------------------------------------------------------------------------------------------------- recipes

identifiers = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=12)
real_keys = st.sampled_from([
    "seed", "name", "training.epochs", "training.learning_rate", "training.batch_size", "training.max_length",
    "training.method", "training.lora.r", "training.checkpoint_every", "canaries.tiers", "canaries.members_per_tier",
    "corpus.builtin_records", "scoring.exposure_references", "tracking.enabled", "model.trust_remote_code", "gates",
])
yaml_values = st.one_of(
    st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False, width=32), st.booleans(), st.none(),
    st.text(max_size=20), st.lists(st.integers(-5, 50), max_size=4),
)


def metric(value: float, n: int | None = None) -> MetricEntry:
    """A flat metric as gates take it (:class:`audit.core.schema.MetricEntry`)."""
    return MetricEntry(value=value, n=n)


@SETTINGS
@given(keys=st.lists(identifiers, min_size=1, max_size=4), value=st.one_of(st.integers(), st.booleans(), st.text(
    alphabet=string.ascii_letters + string.digits + "-_/", min_size=1, max_size=20).filter(lambda s: not s[0].isdigit())))
def test_parse_override_splits_the_key_and_types_the_value(keys, value):
    rendered = {True: "true", False: "false"}.get(value, str(value)) if isinstance(value, bool | int) else value
    parsed_keys, parsed = parse_override(f"{'.'.join(keys)}={rendered}")
    assert parsed_keys == keys
    expected = yaml.safe_load(rendered)
    assert parsed == expected


@SETTINGS
@given(key=st.one_of(real_keys, st.text(max_size=30)),
       value=st.one_of(yaml_values.map(lambda v: yaml.safe_dump(v).split("\n...")[0].strip()), st.text(max_size=30)))
def test_any_override_validates_or_gives_a_one_line_audit_error(key, value):
    try:
        recipe = load_recipe(BASE, [f"{key}={value}"])
    except AuditError as exc:
        message = exc.one_line()
        assert message and "\n" not in message.strip("\n") or "\n" in value or "\n" in key
        return
    assert recipe.name


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-100, 100), st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=8))
random_trees = st.recursive(json_scalars, lambda children: st.one_of(
    st.lists(children, max_size=3),
    st.dictionaries(st.one_of(st.sampled_from(["training", "lora", "epochs", "model", "source", "canaries", "tiers",
                                               "gates", "metric", "max", "name", "scoring"]), st.text(max_size=6)),
                    children, max_size=4)), max_leaves=12)


@SETTINGS
@given(data=st.dictionaries(st.sampled_from(["name", "seed", "model", "training", "canaries", "corpus", "scoring", "gates",
                                             "tracking", "output", "expected", "extra"]), random_trees, max_size=5))
def test_any_recipe_mapping_validates_or_gives_an_audit_error(data):
    try:
        validate_recipe(data, source="fuzz.yaml")
    except AuditError as exc:
        assert exc.one_line().startswith("fuzz.yaml: ")


@SETTINGS
@given(epochs=st.floats(1e-3, 1e3), lr=st.floats(1e-9, 10.0), seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 4096),
       tiers=st.lists(st.integers(1, 1000), min_size=1, max_size=5, unique=True),
       every=st.one_of(st.floats(0, 0.999), st.integers(1, 10**6)))
def test_valid_values_survive_the_recipe_yaml_round_trip(epochs, lr, seed, batch, tiers, every):
    """What `audit run` writes to recipe.yaml reads back as the same recipe (resume depends on it)."""
    recipe = load_recipe(BASE, [f"training.epochs={epochs!r}", f"training.learning_rate={lr!r}", f"seed={seed}",
                                f"training.batch_size={batch}", f"canaries.tiers={tiers}",
                                f"training.checkpoint_every={every!r}"])
    assert (recipe.training.epochs, recipe.training.learning_rate, recipe.seed) == (epochs, lr, seed)
    assert recipe.training.batch_size == batch and recipe.canaries.tiers == tiers
    text = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    again = validate_recipe(yaml.safe_load(text))
    assert again == recipe and again.fingerprint() == recipe.fingerprint()
    assert yaml.safe_dump(again.model_dump(mode="json"), sort_keys=False) == text


@SETTINGS
@given(batch=st.integers(-10**6, 0))
def test_out_of_range_values_name_the_key(batch):
    try:
        load_recipe(BASE, [f"training.batch_size={batch}"])
    except AuditError as exc:
        assert "'training.batch_size'" in str(exc)
    else:
        raise AssertionError("a batch size below 1 was accepted")


@SETTINGS
@given(overrides=st.lists(st.tuples(real_keys, yaml_values), max_size=4))
def test_apply_overrides_never_mutates_its_input(overrides):
    data = {"training": {"epochs": 3, "lora": {"r": 8}}, "seed": 0}
    snapshot = yaml.safe_dump(data)
    items = [f"{k}={yaml.safe_dump(v).split(chr(10) + '...')[0].strip()}" for k, v in overrides]
    try:
        apply_overrides(data, items)
    except AuditError:
        pass
    assert yaml.safe_dump(data) == snapshot


# --------------------------------------------------------------------------------------------------- gates

finite = st.floats(-1e6, 1e6, allow_nan=False)
metric_keys = st.builds(lambda fam, rep, model: f"{fam}/rep_{rep}/{model}",
                        st.sampled_from(["exposure.mean", "extraction.exact", "mia.auc"]), st.integers(0, 64),
                        st.sampled_from(["base", "tuned"]))
metric_dicts = st.dictionaries(metric_keys, st.builds(metric, finite, st.one_of(st.none(), st.integers(1, 100))),
                               min_size=1, max_size=12)


@SETTINGS
@given(value=finite, threshold=finite)
def test_max_gate_passes_exactly_when_value_is_at_most_the_threshold(value, threshold):
    (max_result,) = evaluate_gate(GateSpec(metric="m", max=threshold), {"m": metric(value, 3)})
    (min_result,) = evaluate_gate(GateSpec(metric="m", min=threshold), {"m": metric(value, 3)})
    assert max_result.passed == (value <= threshold)
    assert min_result.passed == (value >= threshold)
    assert max_result.n == 3 and max_result.value == value


@SETTINGS
@given(value=finite, low=finite, raise_by=st.floats(0, 1e6))
def test_raising_a_max_threshold_never_turns_a_pass_into_a_fail(value, low, raise_by):
    metrics = {"m": metric(value)}
    before = evaluate_gate(GateSpec(metric="m", max=low), metrics)[0]
    after = evaluate_gate(GateSpec(metric="m", max=low + raise_by), metrics)[0]
    assert after.passed or not before.passed


@SETTINGS
@given(metrics=metric_dicts, tolerance=st.floats(0, 100), worse=st.sampled_from(["higher", "lower"]),
       family=st.sampled_from(["exposure.mean", "extraction.exact", "mia.auc"]))
def test_a_run_never_regresses_against_itself(metrics, tolerance, worse, family):
    spec = GateSpec(metric=family, tolerance=tolerance, worse=worse)
    results = evaluate_gate(spec, metrics, baseline=metrics)
    keys = matching_keys(spec, metrics)
    if keys:
        assert [r.metric for r in results] == keys
        assert all(r.status == "pass" for r in results)
    else:
        assert len(results) == 1 and results[0].status == "fail"


@SETTINGS
@given(metrics=metric_dicts, pattern=st.text(alphabet=string.ascii_lowercase + "._/", min_size=1, max_size=20),
       threshold=finite)
def test_a_gate_on_a_missing_metric_always_fails(metrics, pattern, threshold):
    spec = GateSpec(metric=pattern, max=threshold)
    assume(not matching_keys(spec, metrics))
    (result,) = evaluate_gate(spec, metrics)
    assert result.status == "fail" and result.value is None and "no metric in the report matches" in result.reason


@SETTINGS
@given(threshold=finite, n=st.one_of(st.none(), st.integers(1, 10)))
def test_nan_never_passes(threshold, n):
    for spec in (GateSpec(metric="m", max=threshold), GateSpec(metric="m", min=threshold)):
        (result,) = evaluate_gate(spec, {"m": metric(math.nan, n)})
        assert result.status == "fail" and result.reason == "value is NaN"


@SETTINGS
@given(metrics=metric_dicts, thresholds=st.lists(st.tuples(st.sampled_from(["exposure.mean", "extraction.exact", "mia.auc"]),
                                                            finite), min_size=1, max_size=4))
def test_every_result_reaches_junit_and_counts_match(metrics, thresholds):
    specs = [GateSpec(metric=family, max=t) for family, t in thresholds]
    results = evaluate_gates(specs, metrics)
    assert len(results) == sum(max(1, len(matching_keys(s, metrics))) for s in specs)
    suite = ET.fromstring(junit_xml(results)).find("testsuite")
    assert int(suite.get("tests")) == len(results) == len(list(suite.iter("testcase")))
    assert int(suite.get("failures")) == sum(not r.passed for r in results) == len(list(suite.iter("failure")))


@SETTINGS
@given(t1=st.floats(0, 40), t2=st.floats(0, 40), n=st.integers(1, 64))
def test_null_tail_is_a_probability_that_falls_as_the_threshold_rises(t1, t2, n):
    low, high = sorted((t1, t2))
    p_low, p_high = exposure_null_tail(low, n), exposure_null_tail(high, n)
    assert 0.0 <= p_high <= 1.0 and 0.0 <= p_low <= 1.0
    assert p_high <= p_low + 1e-12  # monotone up to float rounding (1 - 1e-16 vs 1.0 at thresholds near 0)
