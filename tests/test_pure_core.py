"""The pure core (schema, config, canaries, inject, metrics) must not import torch: it runs anywhere, fast."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import import_cycles_module


def _torch_loaded_after(code: str) -> str:
    """Run ``code`` in a fresh interpreter; ``"True"`` / ``"False"``: whether it left torch in ``sys.modules``."""
    out = subprocess.run([sys.executable, "-c", code + "print('torch' in sys.modules)\n"], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_pure_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import audit.core.schema, audit.core.config, audit.data.canaries, audit.data.inject, audit.metrics\n"
        "import audit.data.corpus, audit.core.lineage\n"
        "from audit.data.canaries import load_spec, generate_canaries\n"
        "from audit.data.inject import inject\n"
        "from audit.data.corpus import builtin_records\n"
        "cs = generate_canaries(load_spec('digits'), seed=0)\n"
        "inject(builtin_records('notes', n=20, seed=0), cs, seed=0)\n"
    )
    assert _torch_loaded_after(code) == "False"


def test_shared_types_and_the_stage_plumbing_import_without_torch():
    """The types the trainer, the pipeline and the worker processes share name no torch (so no cycle is needed)."""
    code = (
        "import sys\n"
        "import audit.train.types, audit.train.weights, audit.core.store, audit.pipeline.resume, audit.pipeline.origin\n"
        "import audit.train.distributed\n"
        "import audit.pipeline.stages, audit.core.gates, audit.report\n"
    )
    assert _torch_loaded_after(code) == "False"


def test_audit_has_no_import_cycle_even_through_function_level_imports():
    ic = import_cycles_module()
    from pathlib import Path

    graph = ic.import_graph(Path(__file__).resolve().parent.parent / "audit")
    assert graph["audit.train.sft"] >= {"audit.train.distributed", "audit.train.types"}  # function-level and module-level seen
    assert ic.cycles(graph) == []


def test_the_origins_never_call_up_into_the_pipeline_and_training_knows_neither():
    """The train stage lives below the origins (audit.train.stage): an origin imports no pipeline module, even inside
    a function, and nothing under audit/train imports an origin or the pipeline (issue 24 item 3)."""
    from pathlib import Path

    graph = import_cycles_module().import_graph(Path(__file__).resolve().parent.parent / "audit")
    pipeline = {"audit.pipeline.stages", "audit.pipeline", "audit.cli", "audit.integrations.api", "audit.integrations.callback",
                "audit.pipeline.measure"}
    assert graph["audit.pipeline.origin"] & pipeline == set()
    assert "audit.train.stage" in graph["audit.pipeline.origin"]
    for module in (m for m in graph if m.startswith("audit.train.")):
        assert graph[module] & (pipeline | {"audit.pipeline.origin"}) == set(), module


def test_the_cycle_checker_finds_a_cycle_and_ignores_type_checking_imports(tmp_path):
    ic = import_cycles_module()
    pkg = tmp_path / "audit"
    (pkg / "train").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "distributed.py").write_text("def f():\n    from audit import resume\n")
    (pkg / "resume.py").write_text("def g():\n    from audit.train.sft import TrainResult\n")
    (pkg / "train" / "sft.py").write_text("from .. import distributed\n")
    (pkg / "lone.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from audit import loner\n")
    (pkg / "loner.py").write_text("import audit.lone\n")
    assert ic.cycles(ic.import_graph(pkg)) == [["audit.distributed", "audit.resume", "audit.train.sft"]]


def test_the_pipeline_layer_names_its_types():
    """Issue 24's typed seams: the origins and the stages name the ground truth, the run context, the train plan, the
    tracker (:class:`audit.report.tracking.RunTracker`) and the scorer, so ``Any`` is left for JSON payloads only (<= 10)."""
    import ast

    root = Path(__file__).resolve().parent.parent / "audit"
    uses = []
    for name in ("pipeline/origin.py", "pipeline/stages.py", "pipeline/__init__.py"):
        tree = ast.parse((root / name).read_text(encoding="utf-8"))
        annotations = [n.annotation for n in ast.walk(tree) if isinstance(n, (ast.arg, ast.AnnAssign)) and n.annotation]
        annotations += [n.returns for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.returns]
        uses += [f"{name}:{a.lineno}" for a in annotations for n in ast.walk(a) if isinstance(n, ast.Name) and n.id == "Any"]
    assert len(uses) <= 10, uses
