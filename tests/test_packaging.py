"""Packaging: the Dockerfile installs what pyproject declares, and the wheel ships recipes/ and canaries/ as data."""

from __future__ import annotations

import re
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, argument) pairs, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, arg = line.partition(" ")
            out.append((instr.upper(), arg.strip()))
    return out


def test_dockerfile_entrypoint_is_the_console_script():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "audit" in pyproject["project"]["scripts"]
    entry = [arg for instr, arg in _dockerfile() if instr == "ENTRYPOINT"]
    assert entry == ['["audit"]']


def test_dockerfile_installs_the_project_with_the_folders_pyproject_packs():
    steps = _dockerfile()
    copied = {arg.split()[0] for instr, arg in steps if instr == "COPY"}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packed = set(pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"])
    assert {"pyproject.toml", "audit"} <= copied
    assert packed <= copied, f"Dockerfile must COPY {packed - copied}"
    installs = [arg for instr, arg in steps if instr == "RUN" and "pip install" in arg and re.search(r"\s\.(\s|$)", arg)]
    assert installs, "the Dockerfile must `pip install .` so it gets exactly pyproject's dependencies"


def test_dockerfile_torch_satisfies_pyproject_and_has_cpu_and_cuda_variants():
    steps = _dockerfile()
    args = [arg for instr, arg in steps if instr == "ARG"]
    assert "VARIANT=cuda" in args
    stages = [arg for instr, arg in steps if instr == "FROM"]
    assert any("cuda" in s and s.endswith("base-cuda") for s in stages)
    assert any(s.endswith("base-cpu") for s in stages)
    assert stages[-1] == "base-${VARIANT}"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    floor = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    minimum = tuple(int(x) for x in floor.split(">=")[1].split(".")[:2])
    for s in stages + [arg for instr, arg in steps if instr == "RUN"]:
        for major, minor in re.findall(r"(?:pytorch:|torch==)(\d+)\.(\d+)", s):
            assert (int(major), int(minor)) >= minimum


@pytest.mark.slow
def test_wheel_ships_recipes_and_canaries_as_data(tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("canary_audit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "audit/_data/recipes/smollm2/lora_cpu.yaml" in names
    assert "audit/_data/canaries/digits.yaml" in names
    assert not any(n.startswith(("recipes/", "canaries/")) for n in names), "data must not become top-level packages"
