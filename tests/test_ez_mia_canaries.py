"""EZ-MIA on canaries the tiny model recalls verbatim: ``audit run tiny/lora_cpu training.epochs=20``.

Twice the recipe's epochs make the tuned model predict every token of the 16x canaries (the error zone is empty), the
case the reference code scores 0, the lowest score, and the one the default SmolLM2 audit reaches on its 16x tier.
The recipe's own 10 epochs leave all-positive error zones instead (tests/test_e2e_tiny.py checks those).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from audit.cli import main
from audit.core.store import read_scores
from audit.report import format_table, read_report


@pytest.fixture(scope="module")
def verbatim_run(tmp_path_factory, request):
    work = tmp_path_factory.mktemp("ez_mia")
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    request.addfinalizer(mp.undo)
    assert main(["run", "tiny/lora_cpu", "--quiet", "--no-tracking", "training.epochs=20"]) == 0
    (run_dir,) = (Path(work) / "runs").iterdir()
    return run_dir


def test_the_16x_canaries_are_recalled_verbatim(verbatim_run):
    """The precondition: every token after the first is the tuned model's top-1 (no error zone), and loss_diff
    separates the tier perfectly."""
    tuned = [s for s in read_scores(verbatim_run / "scores.jsonl", model="tuned") if s.repetitions == 16]
    assert tuned and all(s.token_top1 is not None and all(s.token_top1[1:]) for s in tuned)
    assert read_report(verbatim_run / "report.json").metrics["mia.auc/loss_diff/rep_16"].value == 1.0


def test_ez_mia_ranks_verbatim_recall_as_membership(verbatim_run):
    report = read_report(verbatim_run / "report.json")
    m = report.metrics
    assert m["mia.auc/ez_mia/rep_16"].value >= 0.9  # the reference code: 0.00 (both members at 0, below all six)
    assert m["mia.auc/ez_mia"].value >= 0.9  # and the 1x/4x members with them
    assert not any(k.startswith("mia.inverted/") for k in report.metric_notes)
    assert "mia.degenerate/zlib" in report.metric_notes  # fixed-length digits: zlib repeats loss, and says so
    assert "zlib degenerate (not a result" in format_table(report)
