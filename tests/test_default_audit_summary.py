"""The default audit's evidence lines: TPR at 1% FPR with its interval per tier, the null calibration, and references
outside the null sample (no rank) carried through tiers, metrics, the printed table and the human report.

Hand-made rows summarized by the real metric code (no model): 8 members per tier and 100 references, of which 32 are
ranked, as recipes/smollm2/lora_cpu.yaml (the default) scores them.
"""

from __future__ import annotations

import math
import re

import numpy as np
from helpers import make_report

from audit.core.gates import evaluate_gates, report_metrics
from audit.core.schema import GateSpec, SequenceScore, TierSummary
from audit.report import format_mia_headline, format_null_calibration, format_table, summarize_tiers
from audit.report.render.views import exposure_table, tier_rows, verdict


def rows(seed: int = 0, *, ranked_refs: int = 32, refs: int = 100, per_tier: int = 8, bias: float = 0.0) -> list[SequenceScore]:
    """Members' loss falls with repetitions; references at the null (uniform rank among 256), the first ``ranked_refs``
    ranked, the rest with no rank; ``bias`` bits added to every reference's exposure (a biased measurement)."""
    rng = np.random.default_rng(seed)
    out = []
    for reps, n in ((0, refs), (1, per_tier), (4, per_tier), (16, per_tier)):
        for i in range(n):
            base_loss = 6.0 + rng.normal(0, 0.2)
            for model in ("base", "tuned"):
                gain = 0.0 if model == "base" else math.log2(1 + reps) * 1.2 + rng.normal(0, 0.3)
                loss = max(0.05, base_loss - gain * 0.6)
                ranked = reps > 0 or i < ranked_refs
                rank = max(1, int(rng.integers(1, 257) / 2 ** (gain + (bias if reps == 0 else 0.0)))) if ranked else None
                out.append(SequenceScore(
                    canary_id=f"c{reps:02d}{i:03d}", model=model, repetitions=reps, secret_tokens=6,
                    secret_nll_bits=round(6 * loss / math.log(2), 4), rank=rank, n_references=255 if ranked else None,
                    exposure=None if rank is None else round(8 - math.log2(rank), 4),
                    extracted=(reps == 16 and model == "tuned") if ranked else None,  # measured where exposure is
                    mia_loss=round(loss, 4), mia_min_k=round(-loss * 1.1, 4), mia_min_k_pp=round(-loss / 3, 4),
                    mia_zlib=round(-loss / 12, 4), exact_status=None if ranked else "unranked", secret_utf8_bits=48))
    return out


def test_references_without_a_rank_leave_the_exposure_mean_to_the_ranked_ones():
    scores = rows()
    tiers = {t.repetitions: t for t in summarize_tiers(scores)}
    refs = tiers[0]
    assert refs.n == 100 and refs.exposure_n == 32 and refs.exposure_count == 32
    ranked = [s.exposure for s in scores if s.repetitions == 0 and s.model == "tuned" and s.exposure is not None]
    assert refs.exposure_mean["tuned"] == round(float(np.mean(ranked)), 4)
    assert tiers[16].exposure_n is None  # every member is ranked: the field stays out of report.json
    assert "exposure_n" not in tiers[16].model_dump() and refs.model_dump()["exposure_n"] == 32
    flat = refs.flat_metrics()
    # extraction is measured where exposure is (members and the null sample): its n is the ranked count too
    assert flat["exposure.mean/rep_0/tuned"].n == 32 and flat["extraction.exact/rep_0/tuned"].n == 32
    assert refs.extracted == {"base": 0, "tuned": 0} and tiers[16].extracted == {"base": 0, "tuned": 8}
    assert "0/32" in format_table(make_report(scores)).splitlines()[2]  # the references' row: extracted of ranked
    assert TierSummary.model_validate(refs.model_dump()) == refs


def test_summary_prints_tpr_at_1pct_per_tier_with_intervals_and_the_null_calibration():
    report = make_report(rows())
    headline = format_mia_headline(report)
    assert headline[0].startswith("TPR at 1% FPR (95% Clopper-Pearson interval; n = members, against 100 references")
    by_attack = {line.split(":")[0].strip(): line for line in headline[1:]}
    assert set(by_attack) == {"loss_diff", "min_k_pp_diff"}
    m = report.metrics
    for attack, line in by_attack.items():
        overall = m[f"mia.tpr_at_1pct/{attack}"]
        assert overall.n == 24 and overall.low <= overall.value <= overall.high
        auc = m[f"mia.auc/{attack}"].value
        assert f"all n=24 {overall.value:.2f} [{overall.low:.2f}, {overall.high:.2f}] AUC {auc:.2f}" in line
        for r in (1, 4, 16):
            tier = m[f"mia.tpr_at_1pct/{attack}/rep_{r}"]
            assert f"{r}x n=8 {tier.value:.2f} [{tier.low:.2f}, {tier.high:.2f}]" in line
    null = format_null_calibration(report)
    assert len(null) == 1 and null[0].startswith("null calibration (32 ranked references'")
    base = m["exposure.null_mean/base"]
    assert f"base {base.value:.2f} [{base.low:.2f}, {base.high:.2f}] p=" in null[0] and null[0].endswith("not biased (p >= 0.01)")
    table = format_table(report)  # what `audit run` prints
    assert "100 (32 ranked)" in table and headline[1] in table and null[0] in table
    found = verdict(report).findings  # report.html / report.md open with the same two lines
    assert any(f.startswith("Membership inference, TPR at 1% FPR") and "16x n=8" in f for f in found)
    assert any(f.startswith("Null calibration (32 ranked references'") for f in found)
    assert "100 (32 ranked)" in [r[1] for r in exposure_table(report).rows]
    assert tier_rows(report)[0].ranked == 32


def test_a_biased_null_is_printed_and_fails_the_recipe_gate():
    report = make_report(rows(bias=2.0))
    line = format_null_calibration(report)[0]
    assert "BIASED under base and tuned (p < 0.01)" in line
    flat = report_metrics(report)
    results = evaluate_gates([GateSpec(name="null holds", metric="exposure.null_biased", max=0)], flat)
    assert {r.metric for r in results} == {"exposure.null_biased/base", "exposure.null_biased/tuned"}
    assert all(r.status == "fail" for r in results)
    unbiased = evaluate_gates([GateSpec(name="null holds", metric="exposure.null_biased", max=0)],
                              report_metrics(make_report(rows())))
    assert all(r.status == "pass" for r in unbiased)


def test_too_few_references_print_no_tpr_headline_and_say_why():
    report = make_report(rows(refs=6, ranked_refs=6, per_tier=2))
    assert format_mia_headline(report) == []
    assert "refused: 6 controls, needs >= 100" in format_table(report)


def test_report_html_and_md_render_a_run_whose_references_are_partly_unranked(tmp_path):
    """`audit report` on the default audit's shape: unranked references are left out of the exposure dots, the two
    evidence lines open report.md, and report.json reads back into the same object."""
    from audit.core.store import write_jsonl
    from audit.report import read_report, write_report
    from audit.report.render import render_report

    scores = rows()
    report = make_report(scores)
    write_jsonl(tmp_path / "scores.jsonl", scores)
    write_report(report, tmp_path / "report.json")
    assert read_report(tmp_path / "report.json") == report
    render_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "Null calibration (32 ranked references'" in md and "TPR at 1% FPR (95% Clopper-Pearson" in md
    assert "100 (32 ranked)" in md
    assert "Null calibration (32 ranked references" in (tmp_path / "report.html").read_text()  # the apostrophe is escaped there


def test_the_evidence_lines_fit_a_terminal_line():
    report = make_report(rows())
    lines = format_mia_headline(report) + format_null_calibration(report)
    assert len(lines) == 4 and max(len(line) for line in lines) < 200


def inverted_min_k_pp(scores: list[SequenceScore]) -> list[SequenceScore]:
    """The rows with min_k_pp's sign turned for the members' tuned rows (tuned' = 2 base - tuned): min_k_pp_diff then
    ranks the members the tuning lifted most as the least likely members, where loss_diff separates them."""
    base = {s.canary_id: s.mia_min_k_pp for s in scores if s.model == "base"}
    return [s.model_copy(update={"mia_min_k_pp": 2 * base[s.canary_id] - s.mia_min_k_pp})
            if s.model == "tuned" and s.repetitions > 0 else s for s in scores]


def test_summary_and_report_name_a_flagged_attack_instead_of_printing_its_numbers(tmp_path):
    """zlib repeats loss on fixed-length secrets (mia.degenerate/zlib) and an inverted min_k_pp_diff
    (mia.inverted/min_k_pp_diff): the console summary, the report's verdict and its MIA table say so, no number."""
    from audit.core.store import write_jsonl
    from audit.report import write_report
    from audit.report.render import render_report
    from audit.report.render.views import mia_table

    scores = inverted_min_k_pp(rows())
    report = make_report(scores)
    m, notes = report.metrics, report.metric_notes
    assert m["mia.auc/loss_diff/rep_16"].value == 1.0 and m["mia.auc/min_k_pp_diff/rep_16"].value == 0.0
    assert "mia.inverted/min_k_pp_diff" in notes and "mia.degenerate/zlib" in notes
    table = format_table(report)  # what `audit run` prints
    auc_line = next(line for line in table.splitlines() if line.startswith("membership inference"))
    assert "zlib degenerate (not a result: see metric note mia.degenerate/zlib)" in auc_line
    assert "min_k_pp_diff inverted (not a result: see metric note mia.inverted/min_k_pp_diff)" in auc_line
    assert re.search(r"loss_diff \d\.\d\d, ", auc_line) and not re.search(r"(zlib|min_k_pp_diff) \d", auc_line)
    by_attack = {line.split(":")[0].strip(): line for line in format_mia_headline(report)[1:]}
    assert by_attack["min_k_pp_diff"] == "  min_k_pp_diff: inverted (not a result: see metric note mia.inverted/min_k_pp_diff)"
    assert "16x n=8 1.00" in by_attack["loss_diff"]  # the sound attack keeps its numbers
    assert any("min_k_pp_diff: inverted (not a result" in f for f in verdict(report).findings)
    rows_ = {r[0]: r for r in mia_table(report, []).rows}
    assert rows_["zlib"][1:] == ["degenerate (not a result: see metric note mia.degenerate/zlib)", "-", "-"]
    assert rows_["min_k_pp_diff"][1].startswith("inverted") and rows_["loss_diff"][1] == f"{m['mia.auc/loss_diff'].value:.2f}"
    write_jsonl(tmp_path / "scores.jsonl", scores)
    write_report(report, tmp_path / "report.json")
    render_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "min_k_pp_diff: inverted (not a result: see metric note mia.inverted/min_k_pp_diff)" in md
    assert "mia.inverted/min_k_pp_diff: inverted, not a result: AUC 0.00 on all members (24 members against 100" in md


def test_a_sound_run_flags_nothing_but_the_zlib_repeat():
    report = make_report(rows())
    assert [k for k in report.metric_notes if k.startswith(("mia.inverted", "mia.degenerate"))] == ["mia.degenerate/zlib"]
    assert all("not a result" not in line for line in format_mia_headline(report))
