"""Every per-canary row of an audit turned into flat, stable metric keys (report.json, MLflow and gates share them).

Keys (``rep_<r>`` is a repetition tier, ``rep_0`` the never-inserted references; ``<model>`` is ``base`` or ``tuned``):

==========================================  ==================================================================
``exposure.space_mean/rep_<r>/<model>``     mean exposure over the whole secret space (exact rank where the
                                            walk finished, else the sampled estimate)
``exposure.exact_share/rep_<r>/<model>``    fraction of canaries whose whole-space rank is exact
``exposure.extrapolated_mean/...``          mean skew-normal extrapolated exposure (capped at log2 |R|)
``extraction.from_fraction/...``            canaries greedy decoding completes from prefix + part of the secret
``extraction.lcp_mean/...``                 mean longest common prefix (tokens) of the greedy continuation
``extraction.ned_mean/...``                 mean normalized edit distance of the greedy continuation
``extraction.np_extractable/...``           canaries (n, p)-extractable from their teacher-forced probability
``extraction.sampled_any/...``              canaries reproduced by at least one of N samples
``extraction.sampled_rate/...``             matching samples / all samples, with a Clopper-Pearson interval
``information.bits/...``                    mean bits of the secret given its prefix (sum of -log2 p)
``information.compression/...``             mean secret bits over raw UTF-8 bits
``information.memorized_bits/rep_<r>``      mean drop in secret bits from base to tuned
``mia.auc/<attack>``                        members (all tiers) against references, tuned model
``mia.auc/<attack>/rep_<r>``                one tier's members against the references
``mia.tpr_at_1pct/<attack>``, ``..._0.1pct``  TPR at 1% / 0.1% FPR (refused into ``notes`` when underpowered)
``privacy.eps_lb``, ``privacy.eps_ceiling`` one-run epsilon lower bound and the most its guesses can show
==========================================  ==================================================================

Attacks (all oriented higher = member, see :mod:`audit.metrics.mia`): ``loss``, ``zlib``, ``min_k``, ``min_k_pp``
on the tuned model, and the base-calibrated ``loss_diff``, ``loss_ratio``, ``min_k_pp_diff``.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from audit.metrics.extraction import is_np_extractable
from audit.metrics.mia import InsufficientControlsError, roc_auc, tpr_at_fpr
from audit.metrics.privacy import one_run_audit
from audit.metrics.stats import clopper_pearson
from audit.schema import MetricEntry, ScoringSection, SequenceScore

FPR_TARGETS = {"1pct": 0.01, "0.1pct": 0.001}
PRIVACY_ATTACK = "loss_diff"
"""The score the one-run DP audit guesses from, fixed in advance (no post-hoc choice of attack)."""


@dataclass
class SuiteResult:
    metrics: dict[str, MetricEntry] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def put(self, key: str, value: float, n: int | None = None, low: float | None = None, high: float | None = None) -> None:
        if value is None or not math.isfinite(value):
            return
        self.metrics[key] = MetricEntry(value=round(float(value), 6), n=n,
                                        low=None if low is None else round(low, 6), high=None if high is None else round(high, 6))


def attack_scores(tuned: SequenceScore, base: SequenceScore | None) -> dict[str, float]:
    """Every attack's score for one canary (higher = member); base-calibrated ones only when ``base`` is given."""
    out: dict[str, float] = {}
    if tuned.mia_loss is not None:
        out["loss"] = -tuned.mia_loss
    for name, value in (("zlib", tuned.mia_zlib), ("min_k", tuned.mia_min_k), ("min_k_pp", tuned.mia_min_k_pp)):
        if value is not None:
            out[name] = value
    if base is not None and base.mia_loss is not None and tuned.mia_loss is not None:
        out["loss_diff"] = base.mia_loss - tuned.mia_loss
        if base.mia_loss > 0:
            out["loss_ratio"] = -tuned.mia_loss / base.mia_loss
        if base.mia_min_k_pp is not None and tuned.mia_min_k_pp is not None:
            out["min_k_pp_diff"] = tuned.mia_min_k_pp - base.mia_min_k_pp
    return out


def _mean(rows: list[SequenceScore], get: Callable[[SequenceScore], float | None]) -> tuple[float, int] | None:
    values = [v for v in (get(r) for r in rows) if v is not None]
    return (statistics.fmean(values), len(values)) if values else None


def _tier_metrics(out: SuiteResult, reps: int, model: str, rows: list[SequenceScore], *, np_queries: int,
                  np_probability: float) -> None:
    where = f"rep_{reps}/{model}"
    for key, get in (
        ("exposure.space_mean", lambda r: r.exposure_space),
        ("exposure.extrapolated_mean", lambda r: r.exposure_extrapolated),
        ("extraction.lcp_mean", lambda r: r.extraction_lcp_tokens),
        ("extraction.ned_mean", lambda r: r.extraction_ned),
        ("information.bits", lambda r: r.secret_nll_bits),
        ("information.compression", lambda r: r.secret_nll_bits / r.secret_utf8_bits if r.secret_utf8_bits else None),
    ):
        got = _mean(rows, get)
        if got:
            out.put(f"{key}/{where}", got[0], got[1])
    with_method = [r for r in rows if r.exposure_method is not None]
    if with_method:
        out.put(f"exposure.exact_share/{where}", sum(r.exposure_method == "exact" for r in with_method) / len(with_method),
                len(with_method))
    fraction = [r.extracted_from_fraction for r in rows if r.extracted_from_fraction is not None]
    if fraction:
        out.put(f"extraction.from_fraction/{where}", float(sum(fraction)), len(fraction))
    np_flags = [is_np_extractable(2.0 ** -r.secret_nll_bits, n=np_queries, p=np_probability) for r in rows]
    out.put(f"extraction.np_extractable/{where}", float(sum(np_flags)), len(rows))
    sampled = [r for r in rows if r.sampled_matches is not None and r.sampled_n]
    if sampled:
        out.put(f"extraction.sampled_any/{where}", float(sum(r.sampled_matches > 0 for r in sampled)), len(sampled))
        hits, trials = sum(r.sampled_matches for r in sampled), sum(r.sampled_n for r in sampled)
        prop = clopper_pearson(hits, trials)
        out.put(f"extraction.sampled_rate/{where}", prop.rate, trials, prop.low, prop.high)


def _mia(out: SuiteResult, tuned: list[SequenceScore], base_by_id: dict[str, SequenceScore], convention: str) -> dict[str, list]:
    per_attack: dict[str, tuple[list[float], list[bool], list[int]]] = defaultdict(lambda: ([], [], []))
    for row in tuned:
        for attack, score in attack_scores(row, base_by_id.get(row.canary_id)).items():
            if math.isfinite(score):
                s, member, reps = per_attack[attack]
                s.append(score)
                member.append(row.repetitions > 0)
                reps.append(row.repetitions)
    for attack, (scores, member, reps) in sorted(per_attack.items()):
        members = [s for s, m in zip(scores, member, strict=True) if m]
        controls = [s for s, m in zip(scores, member, strict=True) if not m]
        if not members or not controls:
            continue
        out.put(f"mia.auc/{attack}", roc_auc(members, controls), len(scores))
        for tier in sorted({r for r in reps if r > 0}):
            tier_members = [s for s, r in zip(scores, reps, strict=True) if r == tier]
            out.put(f"mia.auc/{attack}/rep_{tier}", roc_auc(tier_members, controls), len(tier_members) + len(controls))
        for label, fpr in FPR_TARGETS.items():
            key = f"mia.tpr_at_{label}/{attack}"
            try:
                r = tpr_at_fpr(members, controls, fpr, convention=convention)  # type: ignore[arg-type]
            except InsufficientControlsError as exc:
                out.notes[f"mia.tpr_at_{label}"] = (f"refused: {exc.n_controls} controls, needs >= {exc.needed} "
                                                   f"({convention} FPR convention)")
                continue
            out.put(key, r.tpr, r.n_members, r.low, r.high)
            out.notes[f"mia.tpr_at_{label}"] = (f"{convention} FPR convention (empirical FPR {'<=' if convention == 'inclusive' else '<'} "
                                               f"{fpr:g}), {r.n_controls} controls, 95% Clopper-Pearson interval on TPR")
    return dict(per_attack)


def summarize_metrics(
    scores: list[SequenceScore],
    *,
    tuned_label: str = "tuned",
    base_label: str = "base",
    fpr_convention: str = "inclusive",
    np_queries: int = 100,
    np_probability: float = 0.5,
    privacy_delta: float = 1e-5,
    privacy_p_value: float = 0.05,
    privacy_guess_fraction: float = 1.0,
) -> SuiteResult:
    """All metric keys of the module docstring from the per-canary rows of both models."""
    out = SuiteResult()
    groups: dict[tuple[int, str], list[SequenceScore]] = defaultdict(list)
    for s in scores:
        groups[(s.repetitions, s.model)].append(s)
    for (reps, model), rows in sorted(groups.items()):
        _tier_metrics(out, reps, model, rows, np_queries=np_queries, np_probability=np_probability)
    base_by_id = {s.canary_id: s for s in scores if s.model == base_label}
    tuned = [s for s in scores if s.model == tuned_label]
    for reps in sorted({s.repetitions for s in tuned}):
        drops = [base_by_id[s.canary_id].secret_nll_bits - s.secret_nll_bits for s in tuned
                 if s.repetitions == reps and s.canary_id in base_by_id]
        if drops:
            out.put(f"information.memorized_bits/rep_{reps}", statistics.fmean(drops), len(drops))
    out.notes["extraction.np_extractable"] = (f"(n, p) = ({np_queries}, {np_probability:g}): 1 - (1 - p_z)^n >= p with p_z the "
                                              "teacher-forced probability of the secret (Hayes et al. 2025)")

    per_attack = _mia(out, tuned, base_by_id, fpr_convention)
    attack = PRIVACY_ATTACK if PRIVACY_ATTACK in per_attack else "loss"
    if attack in per_attack:
        attack_scores_, member, _ = per_attack[attack]
        m = len(attack_scores_)
        r = max(1, min(m, round(privacy_guess_fraction * m)))
        audit = one_run_audit(attack_scores_, member, k_pos=r // 2, k_neg=r - r // 2, delta=privacy_delta, p_value=privacy_p_value)
        out.put("privacy.eps_lb", audit.eps_lower_bound, audit.m)
        out.put("privacy.eps_ceiling", audit.eps_ceiling, audit.guesses)
        out.put("privacy.guesses", float(audit.guesses), audit.m)
        out.put("privacy.correct", float(audit.correct), audit.guesses)
        out.notes["privacy.eps_lb"] = (
            f"one-run bound (Steinke, Nasr, Jagielski 2023) at delta={privacy_delta:g}, p={privacy_p_value:g}: {audit.correct}/"
            f"{audit.guesses} guesses right from {attack} (top {r // 2} guessed in, bottom {r - r // 2} out, fixed in advance); "
            f"{audit.guesses} guesses can show at most eps={audit.eps_ceiling:.2f}. The bound assumes each canary was "
            "included by an independent fair coin; the harness draws a fixed member/reference split, so read it as indicative"
        )
    return out


def summarize_scores(scores: list[SequenceScore], section: ScoringSection) -> SuiteResult:
    """:func:`summarize_metrics` with the knobs of a recipe's ``scoring`` section."""
    return summarize_metrics(scores, fpr_convention=section.mia_fpr_convention, np_queries=section.np_extraction_queries,
                             np_probability=section.np_extraction_probability, privacy_delta=section.privacy_delta,
                             privacy_p_value=section.privacy_p_value, privacy_guess_fraction=section.privacy_guess_fraction)
