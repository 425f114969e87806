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


def _version(text: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a version string, missing parts 0: "2.6" == "2.6.0"."""
    parts = [int(x) for x in re.match(r"(\d+(?:\.\d+)*)", text).group(1).split(".")]
    return tuple((parts + [0, 0])[:3])


def _transformers_torch_floor() -> tuple[int, ...]:
    """The torch version below which the installed transformers disables torch (and so cannot load any model)."""
    import inspect

    from transformers.utils import import_utils

    source = inspect.getsource(import_utils.is_torch_available.__wrapped__)
    floors = re.findall(r'version\.parse\("(\d+\.\d+(?:\.\d+)?)"\)', source)
    assert floors, "transformers' is_torch_available no longer states a torch floor: update this test"
    return max(_version(f) for f in floors)


def _dockerfile_torch_versions() -> list[tuple[int, ...]]:
    """Every torch the image can install: `torch==X` pins and pytorch/pytorch base tags, ARG defaults substituted."""
    steps = _dockerfile()
    defaults = dict(arg.split("=", 1) for instr, arg in steps if instr == "ARG" and "=" in arg)
    versions = []
    for instr, arg in steps:
        if instr not in {"FROM", "RUN"}:
            continue
        for name, value in defaults.items():
            arg = arg.replace("${" + name + "}", value)
        versions += [_version(v) for v in re.findall(r"(?:pytorch/pytorch:|torch==)(\d+\.\d+(?:\.\d+)?)", arg)]
    return versions


def test_dockerfile_torch_is_one_transformers_accepts_and_has_cpu_and_cuda_variants():
    steps = _dockerfile()
    args = [arg for instr, arg in steps if instr == "ARG"]
    assert "VARIANT=cuda" in args
    stages = [arg for instr, arg in steps if instr == "FROM"]
    assert any(s.endswith("base-cuda") for s in stages)
    assert any(s.endswith("base-cpu") for s in stages)
    assert stages[-1] == "base-${VARIANT}"
    versions = _dockerfile_torch_versions()
    assert len(versions) == 2, "one torch for the CUDA stage and one for the CPU stage"
    floor = _transformers_torch_floor()
    assert floor >= (2, 6, 0)  # transformers 5.24: `Disabling PyTorch because PyTorch >= 2.6 is required`
    assert all(v >= floor for v in versions), f"the image's torch {versions} is below transformers' floor {floor}"


def test_pyproject_torch_floor_is_transformers_floor():
    """pip must not resolve a torch that transformers then disables: pyproject's floor is at least transformers'."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    spec = next(d for d in pyproject["project"]["dependencies"] if re.match(r"torch\b", d))
    assert _version(spec.split(">=")[1]) >= _transformers_torch_floor()


def test_installed_torch_is_not_disabled_by_transformers():
    import torch
    from transformers.utils import is_torch_available

    assert _version(torch.__version__) >= _transformers_torch_floor()
    assert is_torch_available()


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
