"""pytest plugin (entry point ``pytest11``): gate audit reports in a test suite. Imports nothing heavy.

    pytest examples/test_audit_gates.py --audit-report runs/<run>      # gate a report made elsewhere (a GPU box)
    pytest examples/test_audit_gates.py --audit-recipe tiny/lora_cpu   # run the audit once, then gate it
    pytest ... --audit-recipe my.yaml --audit-set training.epochs=2 --audit-gates gates.yaml --audit-baseline runs/<v1>

``--audit-recipe`` runs the audit once per session and remembers the run in pytest's cache under the recipe's
fingerprint (gates excluded: they do not change what is measured), so a second session with the same recipe
reuses the report without importing torch; ``--audit-fresh`` forces a new run. Each option has an ini twin
(``audit_report``, ``audit_recipe``, ``audit_gates``, ``audit_baseline``) for CI configs.

Fixtures: ``audit_report`` (session; the :class:`~audit.core.schema.AuditReport`), ``audit_baseline`` (session; the
baseline report or ``None``), ``audit_gate_specs`` (the gates in force: ``--audit-gates``, else the recipe's).
Helper: :func:`assert_gates` fails the test with the table of failed gates.

torch is imported only when an audit actually runs (tested in a subprocess).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from audit.core.layout import LAYOUT

if TYPE_CHECKING:
    from audit.core.schema import AuditReport, GateResult, GateSpec

_CACHE_PREFIX = "canary_audit/run"
_ORIGIN = pytest.StashKey[str]()
_OPTIONS = {
    "audit_report": "gate an existing report: a run directory or its report.json",
    "audit_recipe": "run this recipe once per session (cached by recipe fingerprint) and gate its report",
    "audit_gates": "gates YAML to apply (default: the recipe's gates)",
    "audit_baseline": "run directory or report.json that tolerance gates compare against",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("canary-audit", "canary-audit release gates")
    for name, help_text in _OPTIONS.items():
        group.addoption("--" + name.replace("_", "-"), dest=name, default=None, metavar="PATH", help=help_text)
        parser.addini(name, help_text, default=None)
    group.addoption("--audit-set", dest="audit_set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe key for --audit-recipe (repeatable)")
    group.addoption("--audit-fresh", dest="audit_fresh", action="store_true",
                    help="run --audit-recipe again even if a cached run with the same fingerprint exists")


def _option(config: pytest.Config, name: str) -> str | None:
    value = config.getoption(name) or config.getini(name)
    return str(value) if value else None


def _fail(problem: Any) -> None:
    __tracebackhide__ = True
    pytest.fail(f"canary-audit: {problem}", pytrace=False)


def audit_fingerprint(recipe: dict[str, Any]) -> str:
    """What the audit measures: the resolved recipe without its gates."""
    from audit.core.schema import sha256_json

    return sha256_json({k: v for k, v in recipe.items() if k != "gates"})


def _run_once(config: pytest.Config, recipe_name: str) -> AuditReport:
    from audit.core.config import load_recipe
    from audit.core.gates import read_report_or_run

    recipe = load_recipe(recipe_name, list(config.getoption("audit_set") or []))
    fingerprint = audit_fingerprint(recipe.model_dump(mode="json"))
    key = f"{_CACHE_PREFIX}/{fingerprint}"
    cache = getattr(config, "cache", None)  # absent under -p no:cacheprovider
    cached = None if config.getoption("audit_fresh") or cache is None else cache.get(key, None)
    if cached and (Path(cached) / LAYOUT.report).is_file():
        report = read_report_or_run(cached)
        if audit_fingerprint(report.recipe) == fingerprint:
            config.stash[_ORIGIN] = f"reused cached run {cached} (recipe fingerprint {fingerprint[:12]})"
            return report
    from audit.pipeline import run_audit  # the heavy edge: torch, transformers, trl

    result = run_audit(recipe, progress=False)
    if cache is not None:
        cache.set(key, str(result.run_dir.resolve()))
    config.stash[_ORIGIN] = f"ran recipe {recipe_name} -> {result.run_dir} (recipe fingerprint {fingerprint[:12]})"
    return result.report


@pytest.fixture(scope="session")
def audit_report(request: pytest.FixtureRequest) -> AuditReport:
    """The audit report under test, from ``--audit-report`` or a once-per-session ``--audit-recipe`` run."""
    from audit.core.errors import AuditError
    from audit.core.gates import read_report_or_run

    config = request.config
    report_path, recipe_name = _option(config, "audit_report"), _option(config, "audit_recipe")
    if report_path and recipe_name:
        _fail("give either --audit-report or --audit-recipe, not both")
    if not report_path and not recipe_name:
        _fail("no audit to gate: pass --audit-report RUN_DIR (an existing run) or --audit-recipe RECIPE (run one)")
    try:
        if report_path:
            config.stash[_ORIGIN] = f"report {report_path}"
            return read_report_or_run(report_path)
        return _run_once(config, recipe_name)
    except AuditError as exc:
        _fail(exc.one_line())
        raise


@pytest.fixture(scope="session")
def audit_baseline(request: pytest.FixtureRequest) -> AuditReport | None:
    """The ``--audit-baseline`` report, or ``None`` (tolerance gates are then skipped, never passed)."""
    from audit.core.errors import AuditError
    from audit.core.gates import read_report_or_run

    path = _option(request.config, "audit_baseline")
    try:
        return read_report_or_run(path) if path else None
    except AuditError as exc:
        _fail(exc.one_line())
        raise


@pytest.fixture(scope="session")
def audit_gate_specs(request: pytest.FixtureRequest, audit_report: AuditReport) -> list[GateSpec]:
    """``--audit-gates FILE``, else the gates of the recipe as given now, else those stored with the report."""
    from audit.core.config import load_recipe
    from audit.core.errors import AuditError
    from audit.core.gates import load_gate_specs, recipe_gates

    config = request.config
    try:
        if path := _option(config, "audit_gates"):
            return load_gate_specs(path)
        if recipe_name := _option(config, "audit_recipe"):
            return list(load_recipe(recipe_name, list(config.getoption("audit_set") or [])).gates)
        return recipe_gates(audit_report)
    except AuditError as exc:
        _fail(exc.one_line())
        raise


def assert_gates(report: AuditReport, gates: Any = None, *, baseline: AuditReport | None = None) -> list[GateResult]:
    """Evaluate gates on ``report``; fail the calling test with the table of failed gates.

    ``gates``: a list of :class:`GateSpec` or mappings, a path to a gates YAML, or ``None`` for the report's own.
    Returns every result, so a test can make further assertions.
    """
    __tracebackhide__ = True
    from audit.core.errors import AuditError
    from audit.core.gates import (
        evaluate_gates,
        format_gate_table,
        load_gate_specs,
        parse_gate_specs,
        recipe_gates,
        report_metrics,
    )

    try:
        if gates is None:
            specs = recipe_gates(report)
        elif isinstance(gates, str | Path):
            specs = load_gate_specs(gates)
        else:
            specs = parse_gate_specs([g if isinstance(g, dict) else g.model_dump() for g in gates], source="assert_gates")
    except AuditError as exc:
        _fail(exc.one_line())
    if not specs:
        _fail(f"no gates to check for {report.run_id}: pass gates=... or add a gates: section to the recipe")
    results = evaluate_gates(specs, report_metrics(report), report_metrics(baseline) if baseline is not None else None,
                             curves=report.curves)
    failed = [r for r in results if not r.passed]
    if failed:
        pytest.fail(f"{len(failed)} of {len(results)} audit gates failed for {report.run_id}:\n"
                    + format_gate_table(results, only_failed=True), pytrace=False)
    return results


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    origin = config.stash.get(_ORIGIN, None)
    if origin:
        terminalreporter.write_line(f"canary-audit: {origin}")
