"""The run-directory layout (audit.layout): every file named once, with its version in one table."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from audit.layout import LAYOUT, SCHEMA_VERSIONS, RunLayout

AUDIT = Path(__file__).resolve().parent.parent / "audit"


def _owned_names() -> set[str]:
    names = {getattr(LAYOUT, f.name) for f in dataclasses.fields(RunLayout)}
    labelled = {LAYOUT.scores_of(""), LAYOUT.calibration_of(""), LAYOUT.works_scan_of("")}  # "scores_.jsonl", ...
    return names | {name.split(".")[0] for name in labelled}  # and the prefixes an f-string builds them from


def test_no_run_directory_file_name_is_spelled_outside_the_layout():
    """A string constant that is exactly a name the layout owns (or a per-model prefix such as ``scores_``) outside
    audit/layout.py is a second place that name lives. Prose that mentions a file (docstrings, messages) is allowed."""
    owned = _owned_names()
    assert {"report.json", "children.jsonl", "scores_", "works_scan_"} <= owned
    found = []
    for path in sorted(AUDIT.rglob("*.py")):
        if path.name == "layout.py" and path.parent == AUDIT:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in owned:
                found.append(f"{path.relative_to(AUDIT.parent)}:{node.lineno}: {node.value!r}")
    assert found == [], "use audit.layout.LAYOUT instead of:\n" + "\n".join(found)


def test_every_file_of_the_layout_has_a_version_decision():
    names = {getattr(LAYOUT, f.name) for f in dataclasses.fields(RunLayout)}
    per_model = {LAYOUT.scores_of("<label>"), LAYOUT.calibration_of("<label>"), LAYOUT.works_scan_of("<label>")}
    assert set(SCHEMA_VERSIONS) == names | per_model
    for name in (LAYOUT.report, LAYOUT.status):
        assert isinstance(SCHEMA_VERSIONS[name], int) and SCHEMA_VERSIONS[name] >= 1, name
    for frozen in (LAYOUT.canaries, LAYOUT.scores):  # rows whose bytes the byte-identity promise fixes: no field added
        assert SCHEMA_VERSIONS[frozen] is None
