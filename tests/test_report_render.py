"""The human report (audit.report.render): report.json round trip, HTML + Markdown with plots, `audit report RUN_DIR`.

Most tests use a hand-made run directory (:func:`make_run_dir`: seeded synthetic scores summarized by the real
metric code), so they run in seconds without a model; the token view and `--probe` use tiny-llama.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from helpers import FAILING, PASSING, make_report, make_run_dir, synthetic_scores

from audit.cli import main
from audit.core.gates import NULL_MEAN_EXPOSURE_BITS
from audit.core.layout import LAYOUT
from audit.core.schema import OutputsSummary
from audit.report import read_report, write_report
from audit.report.render import render_report
from audit.report.render.token_view import (
    CanaryTokens,
    TokenView,
    ViewToken,
    build_canary_view,
    read_token_views,
)
from audit.report.render.views import null_band, roc_curve, roc_curves, verdict

SECTIONS = ["verdict", "exposure", "mia", "extraction", "information", "tokens", "lineage", "provenance", "details"]


# ------------------------------------------------------------------------------------------------ report.json


def test_report_json_round_trips_to_the_same_object_and_bytes(tmp_path):
    _, report = make_run_dir(tmp_path / "run", gates=FAILING)
    again = read_report(tmp_path / "run" / "report.json")
    assert again == report
    write_report(again, tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == (tmp_path / "run" / "report.json").read_bytes()
    assert json.loads((tmp_path / "again.json").read_text())["schema_version"] == report.schema_version


def test_report_json_of_another_schema_version_is_refused(tmp_path):
    _, report = make_run_dir(tmp_path / "run")
    data = json.loads((tmp_path / "run" / "report.json").read_text())
    data["schema_version"] = report.schema_version + 1
    (tmp_path / "run" / "report.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="schema_version"):
        read_report(tmp_path / "run" / "report.json")


# ------------------------------------------------------------------------------------------------ pure views


def test_null_band_matches_simulated_unlearned_canaries():
    """Ranks uniform among 255 references: the band holds ~95% of simulated tier means."""
    rng = np.random.default_rng(7)
    for n in (2, 6, 20):
        ranks = rng.integers(1, 257, size=(20000, n))
        means = (8 - np.log2(ranks)).mean(axis=1)
        low, high = null_band(n, cap=8.0)
        inside = np.mean((means >= low) & (means <= high))
        assert 0.92 <= inside <= 0.975, (n, low, high, inside)
        assert low < NULL_MEAN_EXPOSURE_BITS < high
    assert null_band(2, cap=1.0) == (min(null_band(2)[0], 1.0), 1.0)


def test_roc_curve_area_equals_the_mann_whitney_auc():
    from audit.metrics.mia import roc_auc

    rng = np.random.default_rng(3)
    members, controls = rng.integers(0, 6, 40).astype(float), rng.integers(0, 5, 60).astype(float)  # many ties
    fpr, tpr = roc_curve(list(members), list(controls))
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert all(b >= a for a, b in pairwise(fpr)) and all(b >= a for a, b in pairwise(tpr))
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(members, controls), abs=1e-12)
    fpr, tpr = roc_curve([5.0, 6.0], [1.0, 2.0])  # perfect separation passes through (0, 1)
    assert (0.0, 1.0) in set(zip(fpr, tpr, strict=True))


def test_roc_curves_from_scores_agree_with_the_reported_auc():
    scores = synthetic_scores()
    report = make_report(scores)
    curves = {c.attack: c for c in roc_curves(scores)}
    assert {"loss_diff", "loss", "min_k_pp"} <= set(curves)
    for attack, curve in curves.items():
        assert curve.auc == pytest.approx(report.metrics[f"mia.auc/{attack}"].value, abs=1e-4)
        assert (curve.n_members, curve.n_controls) == (6, 6)


def test_verdict_comes_from_the_gates_and_says_what_the_numbers_show():
    scores = synthetic_scores()
    assert verdict(make_report(scores, gates=PASSING)).status == "pass"
    failed = verdict(make_report(scores, gates=FAILING))
    assert failed.status == "fail" and failed.headline.startswith("FAIL: 1 of 2")
    none = verdict(make_report(scores))
    assert none.status == "none" and "No gates configured" in none.headline
    assert any("16x" in f and "null band" in f for f in none.findings)


def test_canary_view_masks_the_secret_and_picks_the_biggest_gain():
    base = [CanaryTokens("a", 16, ["x", " is"], 2, [-1.0, -5.0, -5.0]),
            CanaryTokens("b", 16, ["y", " is"], 2, [-1.0, -5.0, -5.0])]
    tuned = [CanaryTokens("a", 16, ["x", " is"], 2, [-1.0, -4.0, -4.0]),
             CanaryTokens("b", 16, ["y", " is"], 2, [-1.0, -0.1, -0.1])]
    view = build_canary_view(base, tuned)
    assert view is not None and "canary b" in view.title
    assert [t.text for t in view.tokens] == ["y", " is", None, None]
    assert [t.secret for t in view.tokens] == [False, False, True, True]
    assert view.tokens[0].p_base is None  # the first token has no context
    assert view.tokens[1].p_base == pytest.approx(math.exp(-1.0), rel=1e-3)  # the prefix is public: shown in full
    # a masked token carries no probability (with the base model it would check guesses), only its gain's band:
    # log2(p_tuned / p_base) = 4.9 / ln 2 = 7.1 bits
    assert [(t.p_base, t.p_tuned, t.gain) for t in view.tokens[2:]] == [(None, None, "very large")] * 2
    assert view.bits_base is None and view.bits_tuned is None
    assert TokenView.from_json(json.loads(json.dumps(view.to_json()))) == view


def test_an_old_token_view_is_masked_as_it_is_read():
    """token_view.json of a run before the disclosure rule printed p_base / p_tuned of the secret tokens and the
    secret's bits: re-rendering such a run must not share them again."""
    old = {"title": "canary b (16 copies in training)", "tokens": [
        {"text": "y", "p_base": None, "p_tuned": None, "secret": False},
        {"text": " is", "p_base": 0.3679, "p_tuned": 0.3679, "secret": False},
        {"text": None, "p_base": 0.006738, "p_tuned": 0.9048, "secret": True}],
        "note": "The 16x canary ... masked (x). Secret: 15.3 bits under base, 0.3 under tuned.", "bits_base": 15.3,
        "bits_tuned": 0.3, "schema_version": 1}
    view = TokenView.from_json(old)
    assert view.tokens[2] == ViewToken(None, None, None, secret=True, gain="very large")
    assert view.tokens[1].p_base == 0.3679 and view.bits_base is None and view.bits_tuned is None
    assert "bits under base" not in view.note


# ------------------------------------------------------------------------------------------------ rendering


def _img_sources(html: str) -> list[str]:
    return re.findall(r'<img class="plot" alt="[^"]*" src="([^"]+)"', html)


def test_render_writes_html_markdown_and_plots_in_reading_order(tmp_path):
    run_dir, _ = make_run_dir(tmp_path / "run", gates=FAILING)
    rendered = render_report(run_dir)
    html = rendered.html.read_text()
    positions = [html.index(f'<section id="{s}">') for s in SECTIONS]
    assert positions == sorted(positions), "sections out of order"
    assert html.index("FAIL: 1 of 2 release gates failed") < html.index('<section id="exposure">')
    names = sorted(p.name for p in rendered.plots)
    assert names == ["exposure_by_tier.png", "information.png", "lineage.png", "roc.png", "tokens_0.png"]
    sources = _img_sources(html)
    assert len(sources) == len(names) and all(s.startswith("data:image/png;base64,iVBOR") for s in sources)
    for path in rendered.plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = rendered.markdown.read_text()
    linked = re.findall(r"!\[[^\]]*\]\((plots/[^)]+)\)", md)
    assert sorted(Path(p).name for p in linked) == names and all((run_dir / p).is_file() for p in linked)
    assert md.index("FAIL: 1 of 2") < md.index("## Exposure by repetition tier") < md.index("## Membership inference")
    html = html.replace("<wbr>", "")  # metric keys may wrap after a '/'
    for text in ("null band (95%)", "loss_diff", "greedy exact", "bits saved by tuning", "\u25a0", "tuned_weights:cccc",
                 "exposure.mean/rep_16/tuned", "mia.auc/min_k_pp", "data: builtin:notes + digits canaries"):
        assert text in html and text in md, text


def test_the_verdict_names_the_positive_control_and_says_what_pass_means():
    scores = synthetic_scores()
    passed = verdict(make_report(scores, gates=PASSING))
    assert passed.findings[0].startswith("Positive control: the 16x tier (canaries planted 16 times, to be memorized)")
    assert passed.meaning.startswith("What PASS means for the release: the one gate this recipe sets held")
    assert "does not count against the release" in passed.meaning
    failed = verdict(make_report(scores, gates=FAILING))
    assert failed.meaning.startswith("Do not release as is: 'single copies stay at the null' failed (6 > 5)")
    assert any(re.search(r"reproduced 1 of 6 member secrets verbatim \(16x 1/2, 4x 0/2, 1x 0/2\)", f) for f in passed.findings)


def test_a_missing_positive_control_is_said_not_hidden():
    flat = [s.model_copy(update={"exposure": 1.4}) for s in synthetic_scores()]  # nothing above the null anywhere
    v = verdict(make_report(flat, gates=PASSING))
    assert v.findings[0].startswith("Positive control missing: the 16x tier")


def test_identical_roc_curves_are_one_line_named_for_every_attack(tmp_path):
    from audit.report.render.views import RocCurve, mia_table, roc_groups

    a = RocCurve("loss", [0.0, 0.5, 1.0], [0.0, 1.0, 1.0], 0.75, 2, 2)
    b = RocCurve("zlib", [0.0, 0.5, 1.0], [0.0, 1.0, 1.0], 0.75, 2, 2)
    c = RocCurve("loss_diff", [0.0, 1.0], [0.0, 1.0], 0.5, 2, 2)
    assert [[x.attack for x in g] for g in roc_groups([a, b, c])] == [["loss", "zlib"], ["loss_diff"]]
    report = make_report(synthetic_scores())
    assert any("The ROC curves of loss, zlib coincide exactly" in n for n in mia_table(report, [a, b, c]).notes)


def test_outputs_are_tables_not_a_json_dump(tmp_path):
    run_dir, report = make_run_dir(tmp_path / "run")
    ids = {"canary_ids_exact": [], "canary_ids_near": []}
    outputs = OutputsSummary.model_validate({
        "protocol": {"model": "tuned", "samples": 4, "samples_per_prompt": 2, "prompts": [{"id": "unprompted", "text": ""}],
                     "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 16, "seed": 0,
                     "stop": "at the first end-of-text token", "near_max_edits": 1, "near_unit": "digits", "ngram": 8},
        "tiers": [{"repetitions": 0, "canaries": 6, "exact_canaries": 0, "near_canaries": 1, "samples_exact": 0,
                   "samples_exact_or_near": 1, "rate_exact_high": 0.6024, **ids},
                  {"repetitions": 16, "canaries": 2, "exact_canaries": 1, "near_canaries": 0, "samples_exact": 1,
                   "samples_exact_or_near": 1, "rate_exact_high": 0.806, **ids}],
        "members": 6, "samples_with_member_secret": 1,
        "statement": "1 of 4 samples held a planted secret verbatim under this protocol.", "tokens_generated": 64,
        "works": None, "works_note": "no work excerpts planted", "file": "outputs.jsonl", "fingerprint": "e" * 64,
        "wall_s": 0.1, "reused": False})
    write_report(report.model_copy(update={"outputs": outputs}), run_dir / "report.json")
    html = render_report(run_dir).html.read_text()
    section = html[html.index('<section id="extraction">'): html.index('<section id="information">')]
    assert "<pre>" not in section and '"protocol"' not in section
    assert "1 of 4 samples held a planted secret verbatim" in section
    assert "<td>16x</td><td class=\"num\">2</td><td class=\"num\">1</td>" in section and "samples verbatim or near" in section


def test_report_files_are_shareable_and_secrets_are_not_in_them(tmp_path):
    import os
    import stat

    run_dir, _ = make_run_dir(tmp_path / "run")
    umask = os.umask(0o022)
    try:
        rendered = render_report(run_dir)
    finally:
        os.umask(umask)
    for path in (rendered.html, rendered.markdown, *rendered.plots):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_html_is_self_contained_and_deterministic(tmp_path):
    run_dir, _ = make_run_dir(tmp_path / "run")
    first = render_report(run_dir).html.read_bytes()
    second = render_report(run_dir).html.read_bytes()
    assert first == second
    html = first.decode()
    assert "<script" not in html
    assert not re.search(r'(src|href)="(https?:|//|file:)', html)
    assert "No gates configured" in html


def test_sections_say_when_their_data_is_absent(tmp_path):
    run_dir, _ = make_run_dir(tmp_path / "run", token_view=False)
    (run_dir / "scores.jsonl").unlink()
    report = read_report(run_dir / "report.json").model_copy(update={"metrics": {}, "metric_notes": {}})
    write_report(report, run_dir / "report.json")
    rendered = render_report(run_dir)
    html = rendered.html.read_text()
    assert "No membership-inference scores" in html and "No per-token view" in html
    assert sorted(p.name for p in rendered.plots) == ["exposure_by_tier.png", "lineage.png"]
    assert not (run_dir / "plots" / "roc.png").exists()


def test_a_real_token_view_never_shows_the_secret(tmp_path, tiny_model):
    """tiny-llama scores a canary; the view, the HTML and the Markdown hold its prefix but never its secret."""
    from audit.core.schema import Canary
    from audit.report.render.token_view import canary_token_logprobs, write_token_view

    model, tokenizer = tiny_model
    canary = Canary(id="k1", spec="words", prefix="The vault phrase is ", secret="quixotic zebra", repetitions=16)
    base = canary_token_logprobs(model, tokenizer, [canary])
    assert len(base[0].logprobs) == len(base[0].prefix_pieces) + base[0].n_secret - 1
    run_dir, _ = make_run_dir(tmp_path / "run", token_view=False)
    write_token_view(run_dir, base, base)
    rendered = render_report(run_dir)
    for path in (run_dir / LAYOUT.token_view, rendered.html, rendered.markdown):
        text = path.read_text()
        assert "quixotic" not in text and "zebra" not in text, path
    (view,) = read_token_views(run_dir)
    assert sum(t.secret for t in view.tokens) == base[0].n_secret
    shown = "".join(t.text for t in view.tokens if not t.secret)
    assert canary.prefix.startswith(shown) and len(shown) >= len(canary.prefix) - 2  # the public context, in full


# ------------------------------------------------------------------------------------------------ audit report


def test_audit_report_regenerates_without_loading_a_model(tmp_path):
    """`audit report RUN_DIR` in a fresh process: writes both files and never imports torch (no rescoring)."""
    run_dir, _ = make_run_dir(tmp_path / "run")
    code = ("import sys; from audit.cli import main; rc = main(['report', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "report.html" in out.stdout and out.stderr == ""
    assert (run_dir / "report.html").is_file() and (run_dir / "report.md").is_file()


def test_audit_report_on_a_directory_without_a_report_fails_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "report.json" in err and len(err.splitlines()) == 1


def test_audit_report_probe_adds_the_chosen_text(tmp_path, tiny_model_dir, capsys):
    """--probe runs the real probe on the run's adapter (a fresh tiny LoRA) and renders its tokens."""
    import torch
    from peft import LoraConfig, get_peft_model

    from audit.data.models import load_model_and_tokenizer

    run_dir, _ = make_run_dir(tmp_path / "run")
    model, _ = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft.save_pretrained(str(run_dir / "adapter"), safe_serialization=True)
    (run_dir / "recipe.yaml").write_text("model: {source: tiny-llama}\n")
    assert main(["report", str(run_dir), "--probe", "Colorless green ideas"]) == 0
    probe = json.loads((run_dir / "probe.json").read_text())
    assert probe["text"] == "Colorless green ideas" and probe["tokens"][1]["p_tuned"] is not None
    html = (run_dir / "report.html").read_text()
    assert "chosen text &#x27;Colorless green ideas&#x27;" in html
    assert len(_img_sources(html)) == 6  # the five plots + the probe's token plot
