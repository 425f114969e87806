"""report.html in a real browser: headless Chromium (Debian package ``chromium``) renders it with its plots.

Checks: the screenshot is not blank, the plots' colours are on it (so the base64 PNGs decoded), the DOM holds every
plot, and Chromium logged no console message (the report has no script, so any message is an error). Skips only
when Chromium is not installed; CI installs it (.ci/browser), and fails where it could install it and could not.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from audit.core.schema import GateResult
from audit.report.render import render_report

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install -y "
                                                          "chromium; .ci/run installs it)")
TUNED_ORANGE = (217, 72, 15)  # audit.report.render.plots.MODEL_COLORS["tuned"]: only the plots use it
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
    from helpers import FAILING, make_run_dir

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


BROKEN_WORDS_PROBE = """<script>
const broken = [];
function check(el, kind) {  // a word whose characters sit on more than one line is broken inside
  const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    for (const m of node.data.matchAll(/\\S+/g)) {
      const r = document.createRange();
      r.setStart(node, m.index);
      r.setEnd(node, m.index + m[0].length);
      const lines = new Set(Array.from(r.getClientRects()).map(b => Math.round(b.top)));
      if (lines.size > 1) broken.push(kind + ": " + m[0]);
    }
  }
}
document.querySelectorAll("th").forEach(e => check(e, "header"));
document.querySelectorAll("td.status-PASS, td.status-FAIL, td.status-SKIP").forEach(e => check(e, "result"));
document.querySelectorAll(".verdict h3").forEach(e => check(e, "verdict"));
document.body.dataset.broken = JSON.stringify(broken);
document.body.dataset.checked = String(document.querySelectorAll("th, td[class^=status-]").length);
document.body.dataset.width = String(document.documentElement.clientWidth);
</script>"""


def broken_words(page: Path, work: Path, *, width: int = 800) -> tuple[list[str], int, int]:
    """Words broken across lines in headers and PASS/FAIL cells of ``page`` at ``width`` px, in headless Chromium.

    The report has no script; a copy gets the probe above, so the shipped file stays script-free.
    """
    import html
    import json

    probe = work / "probe.html"
    work.mkdir(parents=True, exist_ok=True)
    probe.write_text(page.read_text().replace("</body>", BROKEN_WORDS_PROBE + "</body>"))
    dom = chromium(probe, work, f"--window-size={width},2000", "--dump-dom").stdout
    attrs = {k: html.unescape(v) for k, v in re.findall(r'data-(broken|checked|width)="([^"]*)"', dom)}
    assert attrs, dom[-2000:]
    return json.loads(attrs["broken"]), int(attrs["checked"]), int(attrs["width"])


RECIPE_GATES = [  # tiny/lora_cpu's gates as an audit reports them: long names and keys squeeze the other columns
    GateResult(gate="references stay at the null (the measurement is unbiased)", metric="exposure.mean/rep_0/tuned",
               value=1.746, n=6, threshold="<= 3.2", status="pass"),
    GateResult(gate="single-copy secrets stay near the null", metric="exposure.mean/rep_1/tuned", value=6.339, n=2,
               threshold="<= 5", status="fail", reason="6.339 > max 5"),
    GateResult(gate="single-copy secrets are not extracted", metric="extraction.exact/rep_1/tuned", value=0.0, n=2,
               threshold="<= 0", status="pass"),
    GateResult(gate="positive control, 16-copy canaries detected", metric="exposure.mean/rep_16/tuned", value=8.0, n=2,
               threshold=">= 5", status="pass"),
]


def test_at_800_px_no_word_breaks_inside_a_header_or_a_pass_fail_cell(tmp_path):
    """(The CSS before this test, overflow-wrap:anywhere, broke the headers "value", "threshold" and "result" here.)"""
    from helpers import make_run_dir

    run_dir, _ = make_run_dir(tmp_path / "run", gates=RECIPE_GATES)
    broken, checked, width = broken_words(render_report(run_dir).html, tmp_path / "chromium")
    assert width <= 800 and checked > 40  # the headers of every table and the gate results were measured
    assert broken == []


def test_the_broken_word_probe_catches_a_broken_word(tmp_path):
    """The same probe on a cramped table that may break anywhere: it finds "value" and "PASS" split."""
    page = tmp_path / "cramped.html"
    page.write_text('<!DOCTYPE html><html><body><table style="width:30px;font-size:20px"><tr>'
                    '<th style="overflow-wrap:anywhere">value</th></tr><tr><td class="status-PASS" '
                    'style="overflow-wrap:anywhere">PASS</td></tr></table></body></html>')
    broken, checked, _ = broken_words(page, tmp_path / "chromium")
    assert checked == 2 and broken == ["header: value", "result: PASS"]
