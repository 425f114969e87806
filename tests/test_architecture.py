"""The layer map in docs/architecture.md is the import rule: a module imports only its own layer and the ones above
it in the table, function-level imports included, and audit/ has no entry the map does not name (issue 24 item 8)."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import import_cycles_module

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| (\d+) \| `(audit(?:\.\w+)?)` \|", re.M)


def layer_table() -> dict[str, int]:
    """``{"audit.core": 1, ...}`` from the table in docs/architecture.md."""
    return {name: int(n) for n, name in ROW.findall((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))}


def layer_of(module: str, table: dict[str, int]) -> int | None:
    parts = module.split(".")
    return table.get(".".join(parts[:2])) if len(parts) > 1 else None  # `audit` itself: the lazy public names


def upward_imports(graph: dict[str, set[str]], table: dict[str, int]) -> list[str]:
    """Every import of a module in a later layer than the importer's: ``"a -> b"``."""
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if None not in (layer_of(a, table), layer_of(b, table)) and layer_of(b, table) > layer_of(a, table))


def test_no_module_imports_a_later_layer():
    graph = import_cycles_module().import_graph(ROOT / "audit")
    assert upward_imports(graph, layer_table()) == []


def test_the_rule_catches_an_upward_import_even_inside_a_function(tmp_path):
    pkg = tmp_path / "audit"
    for name in ("core", "pipeline"):
        (pkg / name).mkdir(parents=True)
        (pkg / name / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "store.py").write_text("def f():\n    from audit.pipeline import stages\n")
    (pkg / "pipeline" / "stages.py").write_text("from audit.core import store\n")
    graph = import_cycles_module().import_graph(pkg)
    assert upward_imports(graph, {"audit.core": 1, "audit.pipeline": 7}) == ["audit.core.store -> audit.pipeline",
                                                                             "audit.core.store -> audit.pipeline.stages"]


def test_audit_has_at_most_twelve_entries_and_the_map_names_each():
    entries = sorted(p.stem for p in (ROOT / "audit").iterdir() if p.name != "__pycache__" and not p.name.startswith("."))
    table = layer_table()
    assert len(entries) <= 12, entries
    assert {f"audit.{e}" for e in entries if e != "__init__"} == set(table), "docs/architecture.md and audit/ differ"
    assert sorted(table.values()) == list(range(1, len(table) + 1))  # one package per layer, numbered in order
