"""The test suite's own layout: test modules share helpers through tests/helpers.py and conftest.py fixtures, never by
importing one another (a test module imported elsewhere runs again under a second name, and its private helpers
become an API that nobody editing it can see)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_test_modules(source: str) -> list[str]:
    """The ``test_*`` modules that ``source`` imports, at any depth (inside functions too), as written."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            # `from . import test_x` and `from tests import test_x` name the module in the alias
            names = [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name.startswith("test_")]
        else:
            continue
        found += [name for name in names if any(part.startswith("test_") for part in name.split("."))]
    return found


def test_the_import_finder_sees_every_spelling_of_a_test_module_import():
    source = """
import os
from helpers import make_report
from test_gates import tier_report
import tests.test_works
def f():
    from tests.test_canaries import FakeSampler
    from .test_resume import AUDIT
    from tests import test_cli
"""
    assert imported_test_modules(source) == ["test_gates", "tests.test_works", "tests.test_canaries", "test_resume",
                                             "tests.test_cli"]


def test_no_test_module_imports_another_test_module():
    offenders = {path.name: found for path in sorted(TESTS.glob("*.py"))
                 if (found := imported_test_modules(path.read_text()))}
    assert offenders == {}, f"move the shared helpers into tests/helpers.py or a conftest.py fixture: {offenders}"
