""".ci/browser: CI fails where Chromium could be installed and was not, and says so where it cannot be installed,
so the browser test of the report (tests/test_browser_report.py) never skips into a green run unnoticed.

Each case runs the script with a PATH holding only fake ``id``, ``apt-get`` and (maybe) ``chromium`` commands."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "browser"
BASH = shutil.which("bash")


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!{BASH}\n{body}\n")
    path.chmod(0o755)


def _run(tmp_path: Path, *, uid: int, apt: str | None, chromium: bool = False) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "id", f"echo {uid}")
    if apt is not None:
        _fake(bin_dir, "apt-get", apt)
    if chromium:
        _fake(bin_dir, "chromium", "exit 0")
    return subprocess.run([BASH, str(SCRIPT)], env={"PATH": str(bin_dir)}, capture_output=True, text=True, timeout=30)


def test_a_failed_install_as_root_fails_ci(tmp_path):
    done = _run(tmp_path, uid=0, apt="exit 100")
    assert done.returncode == 1 and "could not install chromium" in done.stderr and done.stdout == ""


def test_an_install_that_leaves_no_browser_fails_ci(tmp_path):
    done = _run(tmp_path, uid=0, apt="exit 0")
    assert done.returncode == 1 and "could not install chromium" in done.stderr


def test_a_successful_install_passes_quietly(tmp_path):
    bin_dir = tmp_path / "bin"
    apt = f'[ "$1" = install ] && printf "#!{BASH}\\nexit 0\\n" > {bin_dir}/chromium && chmod +x {bin_dir}/chromium; exit 0'
    done = _run(tmp_path, uid=0, apt=apt)
    assert done.returncode == 0 and done.stdout == "", done.stderr
    assert (bin_dir / "chromium").is_file()


@pytest.mark.parametrize("apt", ["exit 0", None], ids=["not-root", "no-apt-get"])
def test_where_it_cannot_install_it_warns_that_the_browser_test_did_not_run(tmp_path, apt):
    done = _run(tmp_path, uid=1000 if apt else 0, apt=apt)
    assert done.returncode == 0 and "WARNING" in done.stdout and "tests/test_browser_report.py did NOT run" in done.stdout


def test_an_installed_browser_needs_nothing(tmp_path):
    done = _run(tmp_path, uid=0, apt="echo apt-get was called >&2; exit 100", chromium=True)
    assert done.returncode == 0 and done.stdout == "" and "apt-get was called" not in done.stderr
