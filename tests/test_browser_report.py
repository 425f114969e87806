"""report.html in a real browser: headless Chromium (Debian package ``chromium``) renders it with its plots.

Checks: the screenshot is not blank, the plots' colours are on it (so the base64 PNGs decoded), the DOM holds every
plot, and Chromium logged no console message (the report has no script, so any message is an error). Skips only
when Chromium is not installed; CI (.ci/run) installs it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from audit.render import render_report

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install -y "
                                                          "chromium; .ci/run installs it)")
TUNED_ORANGE = (217, 72, 15)  # audit.render.plots.MODEL_COLORS["tuned"]: only the plots use it
CONSOLE = re.compile(r":CONSOLE[:(]|Uncaught")


def chromium(page: Path, work: Path, *args: str) -> subprocess.CompletedProcess:
    work.mkdir(parents=True, exist_ok=True)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", f"--user-data-dir={work / 'profile'}",
           "--enable-logging=stderr", "--v=0", "--hide-scrollbars", *args, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if CONSOLE.search(line)]


def screenshot(page: Path, work: Path, *, size: str = "1100,2600") -> tuple[np.ndarray, list[str]]:
    from PIL import Image

    shot = work / "screenshot.png"
    out = chromium(page, work, f"--window-size={size}", f"--screenshot={shot}")
    assert shot.is_file(), out.stderr[-2000:]
    return np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16), console_messages(out.stderr)


def test_report_renders_with_its_plots_in_headless_chromium(tmp_path):
    from test_report_render import FAILING, make_run_dir

    run_dir, _ = make_run_dir(tmp_path / "run", gates=FAILING)
    rendered = render_report(run_dir)
    pixels, console = screenshot(rendered.html, tmp_path / "chromium")
    print(f"screenshot: {tmp_path / 'chromium' / 'screenshot.png'}")
    assert console == []
    assert pixels.shape[:2] == (2600, 1100)
    assert pixels.std() > 20, "the screenshot is blank"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200, "too few colours for text and plots"
    orange = np.all(np.abs(pixels - np.array(TUNED_ORANGE)) <= 12, axis=-1).sum()
    assert orange > 1000, f"the tuned bars of the exposure plot are not on screen ({orange} px)"
    dom = chromium(rendered.html, tmp_path / "dom", "--dump-dom")
    assert console_messages(dom.stderr) == []
    assert dom.stdout.count('<img class="plot"') == len(rendered.plots) == 5
    assert "FAIL: 1 of 2 release gates failed" in dom.stdout


def test_the_checks_catch_a_broken_page(tmp_path):
    """The same checks on a page with a script error and no plots: they fail, so the test above can fail."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><img src="data:image/png;base64,AAAA">'
                    '<script>undefined_function();</script></body></html>')
    pixels, console = screenshot(page, tmp_path / "chromium", size="400,300")
    assert any("Uncaught ReferenceError" in line for line in console)
    assert np.all(np.abs(pixels - np.array(TUNED_ORANGE)) <= 12, axis=-1).sum() == 0
