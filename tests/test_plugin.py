"""The pytest plugin: options, fixtures, the failure table, the entry point, and no torch unless an audit runs.

Each case runs a real pytest session in a subprocess on the shipped example file (examples/test_audit_gates.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from helpers import tier_report

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "test_audit_gates.py"
TABLE_HEADER = ["gate", "metric", "value", "threshold", "n", "result"]


def run_pytest(cwd: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rN", "--rootdir", str(cwd), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def suite(tmp_path):
    """A folder holding the shipped example test file, plus a check that gating a report never imports torch."""
    shutil.copy(EXAMPLE, tmp_path / EXAMPLE.name)
    (tmp_path / "test_no_torch.py").write_text(
        "import sys\n\n"
        "def test_gating_a_report_does_not_import_torch(audit_report, audit_gate_specs):\n"
        "    from audit.integrations.pytest_plugin import assert_gates\n"
        "    assert_gates(audit_report, audit_gate_specs)\n"
        "    assert 'torch' not in sys.modules\n")
    return tmp_path


RECIPE_GATES = [{"name": "single-copy secrets stay near the null", "metric": "exposure.mean/rep_1/tuned", "max": 5.0}]


def write_run(path: Path, tiers) -> Path:
    path.mkdir(parents=True)
    (path / "report.json").write_text(tier_report(tiers, gates=RECIPE_GATES, run_id=path.name).model_dump_json())
    return path


def failure_table(output: str) -> list[str]:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == TABLE_HEADER)
    return lines[start:]


def test_plugin_is_registered_through_the_pytest11_entry_point():
    (ep,) = [e for e in entry_points(group="pytest11") if e.name == "canary_audit"]
    assert ep.value == "audit.integrations.pytest_plugin"


def test_importing_the_plugin_and_gating_a_report_does_not_import_torch(tmp_path):
    run = write_run(tmp_path / "run", {1: (2, 1.2, 0)})
    code = ("import sys\n"
            "import audit.integrations.pytest_plugin\n"
            "from audit.core.gates import read_report_or_run\n"
            "from audit.integrations.pytest_plugin import assert_gates\n"
            f"assert_gates(read_report_or_run({str(run)!r}))\n"
            "from audit.cli import main\n"
            f"assert main(['gate', {str(run)!r}]) == 0\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_audit_report_option_passes_on_a_clean_report(suite):
    run = write_run(suite / "runs" / "clean", {0: (6, 1.4, 0), 1: (2, 1.6, 0), 16: (2, 8.0, 2)})
    result = run_pytest(suite, "--audit-report", str(run))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
    assert f"canary-audit: report {run}" in result.stdout


def test_audit_report_option_fails_with_the_table_of_failed_gates(suite):
    run = write_run(suite / "runs" / "leaky", {0: (6, 1.4, 0), 1: (2, 7.5, 1), 16: (2, 8.0, 2)})
    result = run_pytest(suite, "--audit-report", str(run), "-p", "no:cacheprovider")
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "3 failed" in out
    assert "1 of 1 audit gates failed for leaky:" in out  # the recipe's gate
    assert "2 of 2 audit gates failed for leaky:" in out  # the example's inline gates
    table = failure_table(out)
    assert table[2].split()[-1] == "FAIL" and "exposure.mean/rep_1/tuned" in table[2]
    assert "FAIL single-copy secrets not extracted [extraction.exact/rep_1/tuned]: 1 > max 0" in out
    assert "Traceback" not in out and "def test_" not in out  # the table, not a Python traceback


def test_gates_file_and_baseline_options(suite, tmp_path):
    run = write_run(suite / "runs" / "new", {1: (2, 3.0, 0)})
    old = write_run(suite / "runs" / "old", {1: (2, 1.5, 0)})
    gates = suite / "gates.yaml"
    gates.write_text("- {name: no regression, metric: exposure.mean/rep_1/tuned, tolerance: 1.0, worse: higher}\n")
    result = run_pytest(suite, "--audit-report", str(run), "--audit-gates", str(gates), "--audit-baseline", str(old),
                        "-k", "recipe_gates")
    assert result.returncode == 1
    assert "FAIL no regression [exposure.mean/rep_1/tuned]: regressed 1.5 above the baseline (tolerance 1)" in result.stdout


def test_without_an_audit_option_the_fixture_says_what_to_pass(suite):
    result = run_pytest(suite, "-k", "recipe_gates")
    assert result.returncode == 1
    assert "canary-audit: no audit to gate: pass --audit-report RUN_DIR" in result.stdout


def test_a_missing_report_is_one_line_not_a_traceback(suite):
    result = run_pytest(suite, "--audit-report", "runs/nothing", "-k", "recipe_gates")
    assert result.returncode == 1
    assert "canary-audit: report runs/nothing does not exist (fix: give a run directory" in result.stdout
    assert "Traceback" not in result.stdout


# --------------------------------------------------------------------------------------------------- real audits


@pytest.mark.slow
def test_example_gate_passes_on_the_shipped_tiny_recipe_and_reuses_the_run(suite):
    args = ("--audit-recipe", "tiny/lora_cpu", "--audit-set", "tracking.enabled=false")
    first = run_pytest(suite, EXAMPLE.name, *args)  # this session runs the audit, so it imports torch
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "2 passed" in first.stdout
    assert "canary-audit: ran recipe tiny/lora_cpu -> runs/" in first.stdout
    runs = list((suite / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "report.json").is_file()
    # The second session finds the run by recipe fingerprint: no new run, and gating imports no torch
    # (test_no_torch.py checks sys.modules).
    second = run_pytest(suite, *args)
    assert second.returncode == 0, second.stdout[-3000:]
    assert f"canary-audit: reused cached run {runs[0].resolve()}" in second.stdout
    assert list((suite / "runs").iterdir()) == runs
    assert "3 passed" in second.stdout


@pytest.mark.slow
def test_example_gate_fails_with_a_readable_table_on_a_recipe_that_memorizes(suite):
    """tiny/full_cpu memorizes even the single-copy canaries (exposure at the 8-bit cap)."""
    result = run_pytest(suite, EXAMPLE.name, "--audit-recipe", "tiny/full_cpu", "--audit-set", "tracking.enabled=false",
                        "-p", "no:cacheprovider")
    out = result.stdout
    assert result.returncode == 1, out[-3000:] + result.stderr[-3000:]
    table = failure_table(out)
    row = next(line for line in table if "single-copy secrets near the null" in line)
    cells = row.split()
    assert cells[-1] == "FAIL" and "exposure.mean/rep_1/tuned" in cells
    assert float(cells[cells.index("exposure.mean/rep_1/tuned") + 1]) > 5.0
    assert "audit gates failed for tiny-full-cpu-" in out
    assert "2 failed" in out  # both example tests: the recipe's gates and the inline single-copy gates
