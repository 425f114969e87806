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
``mia.tpr_at_1pct/<attack>/rep_<r>``        one tier's TPR at 1% FPR against all references, for the
                                            base-calibrated headline attacks (``TIER_TPR_ATTACKS``)
``exposure.null_mean/<model>``              the references' sampled exposure: mean, n, t interval
``exposure.null_p/<model>``                 z-test of that mean against the uniform-rank null (~1/ln 2 bits)
``exposure.null_biased/<model>``            1.0 when ``null_p`` < 0.01: exposure thresholds are not to be trusted
``privacy.eps_lb``, ``privacy.eps_ceiling`` one-run epsilon lower bound (Steinke et al.) and the most its guesses
                                            can show
``privacy.eps_lb/<method>``                 the same guesses under each method of ``privacy.BOUND_METHODS``
``privacy.eps_lb/<method>_best_k``          the best over a guess-count grid fixed in advance, Bonferroni-paid
==========================================  ==================================================================

Attacks (all oriented higher = member, see :mod:`audit.metrics.mia`): ``loss``, ``zlib``, ``min_k``, ``min_k_pp``
on the tuned model, and the base-calibrated ``loss_diff``, ``loss_ratio``, ``min_k_pp_diff``, all on the secret's
tokens (the keys they always had). Rows that carry the per-token view of the whole text (``token_logprobs``, ...)
add ``<attack>_text`` (the whole canary text, the scope their papers define), ``ez_mia`` (whole text, as its paper)
and ``ez_mia_secret``. ``notes["mia.scope/<attack>"]`` states each attack's scope and its paper's, an attack
whose ordering coincides with loss's on this spec (zlib on fixed-length secrets) is flagged in
``notes["mia.degenerate/<attack>"]``, and one that ranks members below the references where another attack
separates them (a sign error or a degenerate score: :data:`INVERTED_AUC`) in ``notes["mia.inverted/<attack>"]``. The
summary and the report print a flagged attack as not a result; its metric keys stay.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from audit.core.schema import MetricEntry, ScoringSection, SequenceScore
from audit.metrics.exposure import null_calibration
from audit.metrics.extraction import is_np_extractable
from audit.metrics.mia import (
    ATTACK_SCOPES,
    InsufficientControlsError,
    difference_to_base,
    ez_mia_score,
    loss_score,
    mean_loss,
    min_k_plus_plus_score,
    min_k_score,
    ordering_agreement,
    ratio_to_base,
    roc_auc,
    tpr_at_fpr,
    zlib_bytes,
    zlib_mimir_score,
)
from audit.metrics.privacy import (
    BOUND_METHODS,
    GAUSSIAN_NULL_METHODS,
    best_of_guess_counts,
    epsilon_lower_bound_by,
    one_run_audit,
)
from audit.metrics.stats import clopper_pearson

FPR_TARGETS = {"1pct": 0.01, "0.1pct": 0.001}
PRIVACY_ATTACK = "loss_diff"
"""The score the one-run DP audit guesses from, fixed in advance (no post-hoc choice of attack)."""
TIER_TPR_ATTACKS = ("loss_diff", "min_k_pp_diff", "loss_diff_text", "min_k_pp_diff_text", "ez_mia")
"""Base-calibrated attacks whose TPR at low FPR is also reported per tier (the MIA headline, issue 15)."""
DEGENERATE_AGREEMENT = 0.99
"""An attack that orders at least this share of canary pairs as ``loss`` does adds nothing to it: flagged."""
INVERTED_AUC = 0.2
"""An attack at or below this AUC on a tier (or on all members) where another attack reaches :data:`SEPARATING_AUC`
is flagged as inverted. A weak but sound attack sits near 0.5 there; one that ranks members below 80% of references
while another attack separates them reads the evidence with the wrong sign (EZ-MIA's zeros on memorized canaries
gave 0.00-0.21). Under the no-signal null the AUC has sd sqrt((n1 + n0 + 1) / (12 n1 n0)): 0.107 for the default
audit's tiers (8 members, 100 references), so 0.2 is 2.8 sd below 0.5 there."""
SEPARATING_AUC = 0.95
"""A tier counts as separable when some attack reaches this AUC: the members differ from the references."""
INVERTED_P = 0.05
"""...and both beyond chance at the group's n: the inverted attack's one-sided Mann-Whitney p (members below) and the
separating attack's (members above) at most 0.05 / m, where m is the number of attacks compared on that group
(Bonferroni: every attack of the group is a test, and the best of ~20 is picked). With 2 members and 6 references
(``tiny/lora_cpu``) the smallest p there is, 1/28 = 0.036, is above 0.05 / 20: such a tier is never flagged, whatever
its AUCs (with one epoch of training, chance alone put loss_diff at 0.00 and another attack at 1.00 on a tier). With 8
members and 100 references an AUC of 0.00 has p ~ 6e-12, 0.20 about 2.5e-3."""
NULL_ALPHA = 0.01
"""Level of the null-calibration test: a run is flagged biased at p < 0.01 (a 1% false alarm rate)."""


@dataclass
class SuiteResult:
    metrics: dict[str, MetricEntry] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def put(self, key: str, value: float, n: int | None = None, low: float | None = None, high: float | None = None) -> None:
        if value is None or not math.isfinite(value):
            return
        self.metrics[key] = MetricEntry(value=round(float(value), 6), n=n,
                                        low=None if low is None else round(low, 6), high=None if high is None else round(high, 6))


def token_view_fields(logprobs, top1, vocab_mean, vocab_var, *, prefix_tokens: int, text: str) -> dict[str, object]:
    """The optional per-token fields of a :class:`SequenceScore` from one teacher-forced pass over the whole text.

    For the engine: ``logprobs[j]`` scores token j + 1 of the text (token 0 is unscored), ``top1[j]`` is whether the
    argmax at that step is that token, ``prefix_tokens`` is the number of the prefix's tokens (so the secret's
    first score sits at ``prefix_tokens - 1``). Counts and log-probs only: the text itself is reduced to its zlib
    length here and never stored.
    """
    n = len(logprobs)
    for name, values in (("top1", top1), ("vocab_mean", vocab_mean), ("vocab_var", vocab_var)):
        if values is not None and len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries for {n} scored tokens")
    return dict(token_logprobs=[float(x) for x in logprobs],
                token_top1=None if top1 is None else [bool(x) for x in top1],
                token_vocab_mean=None if vocab_mean is None else [float(x) for x in vocab_mean],
                token_vocab_var=None if vocab_var is None else [float(x) for x in vocab_var],
                secret_token_offset=prefix_tokens - 1, text_zlib_bytes=zlib_bytes(text))


def _token_view(row: SequenceScore | None) -> tuple[np.ndarray, slice] | None:
    """The whole text's token log-probs and the slice of the secret in them, when the row carries them."""
    if row is None or row.token_logprobs is None or row.secret_token_offset is None or not row.token_logprobs:
        return None
    start = row.secret_token_offset
    return np.asarray(row.token_logprobs, dtype=np.float64), slice(start, start + row.secret_tokens)


def _text_attacks(tuned: SequenceScore, base: SequenceScore | None, k: float) -> dict[str, float]:
    """Whole-text attacks and EZ-MIA from the per-token view (:data:`audit.metrics.mia.ATTACK_SCOPES`)."""
    view = _token_view(tuned)
    if view is None:
        return {}
    lp, secret = view
    out = {"loss_text": loss_score(lp), "min_k_text": min_k_score(lp, k=k)}
    if tuned.text_zlib_bytes:
        out["zlib_text"] = zlib_mimir_score(lp, tuned.text_zlib_bytes)
    with_stats = tuned.token_vocab_mean is not None and tuned.token_vocab_var is not None
    if with_stats:
        out["min_k_pp_text"] = min_k_plus_plus_score(lp, tuned.token_vocab_mean, tuned.token_vocab_var, k=k)
    base_view = _token_view(base)
    if base is None or base_view is None or base_view[0].shape != lp.shape:
        return out
    lp_base = base_view[0]
    out["loss_diff_text"] = difference_to_base(mean_loss(lp), mean_loss(lp_base))
    if with_stats and base.token_vocab_mean is not None and base.token_vocab_var is not None:
        out["min_k_pp_diff_text"] = out["min_k_pp_text"] - min_k_plus_plus_score(
            lp_base, base.token_vocab_mean, base.token_vocab_var, k=k)
    if tuned.token_top1 is not None and len(tuned.token_top1) == lp.size:
        top1 = np.asarray(tuned.token_top1, dtype=bool)
        # whole text without its first scored position, as the reference code masks it (ez_score.py, ignore_bos)
        out["ez_mia"] = ez_mia_score(lp[1:], lp_base[1:], top1[1:])
        out["ez_mia_secret"] = ez_mia_score(lp[secret], lp_base[secret], top1[secret])
    return out


def attack_scores(tuned: SequenceScore, base: SequenceScore | None, *, k: float = 0.2) -> dict[str, float]:
    """Every attack's score for one canary (higher = member); base-calibrated ones only when ``base`` is given.

    ``k`` is the Min-K% fraction of the whole-text attacks (the secret-scope ones were reduced by the engine).
    """
    out: dict[str, float] = {}
    if tuned.mia_loss is not None:
        out["loss"] = -tuned.mia_loss
    for name, value in (("zlib", tuned.mia_zlib), ("min_k", tuned.mia_min_k), ("min_k_pp", tuned.mia_min_k_pp)):
        if value is not None:
            out[name] = value
    if base is not None and base.mia_loss is not None and tuned.mia_loss is not None:
        out["loss_diff"] = difference_to_base(tuned.mia_loss, base.mia_loss)
        if (ratio := ratio_to_base(tuned.mia_loss, base.mia_loss)) is not None:
            out["loss_ratio"] = ratio
        if base.mia_min_k_pp is not None and tuned.mia_min_k_pp is not None:
            out["min_k_pp_diff"] = tuned.mia_min_k_pp - base.mia_min_k_pp
    out.update(_text_attacks(tuned, base, k))
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


def _mia(out: SuiteResult, tuned: list[SequenceScore], base_by_id: dict[str, SequenceScore], convention: str,
         k: float = 0.2) -> dict[str, list]:
    per_attack: dict[str, tuple[list[float], list[bool], list[int]]] = defaultdict(lambda: ([], [], []))
    for row in tuned:
        for attack, score in attack_scores(row, base_by_id.get(row.canary_id), k=k).items():
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
            out.notes[f"mia.tpr_at_{label}"] = (f"{convention} FPR convention "
                                               f"(empirical FPR {'<=' if convention == 'inclusive' else '<'} "
                                               f"{fpr:g}), {r.n_controls} controls, 95% Clopper-Pearson interval on TPR")
            if attack in TIER_TPR_ATTACKS:
                for tier in sorted({r for r in reps if r > 0}):
                    tier_members = [s for s, t in zip(scores, reps, strict=True) if t == tier]
                    got = tpr_at_fpr(tier_members, controls, fpr, convention=convention)  # type: ignore[arg-type]
                    out.put(f"{key}/rep_{tier}", got.tpr, got.n_members, got.low, got.high)
    _scope_notes(out, per_attack)
    _inversion_notes(out, per_attack)
    return dict(per_attack)


def _inversion_notes(out: SuiteResult, per_attack: dict[str, tuple[list[float], list[bool], list[int]]]) -> None:
    """Flag an attack whose AUC is far below 0.5 where another attack separates members from references."""
    tiers = sorted({r for _, _, reps in per_attack.values() for r in reps if r > 0})
    found: dict[str, list[str]] = defaultdict(list)
    for suffix, label, tier in [("", "all members", None)] + [(f"/rep_{t}", f"the {t}x tier", t) for t in tiers]:
        aucs = {a: out.metrics[f"mia.auc/{a}{suffix}"].value for a in sorted(per_attack) if f"mia.auc/{a}{suffix}" in out.metrics}
        best = max(aucs, key=aucs.__getitem__, default=None)
        if best is None or aucs[best] < SEPARATING_AUC:
            continue
        level = INVERTED_P / len(aucs)  # Bonferroni over the attacks compared on this group

        def p_value(attack: str, alternative: str, tier: int | None = tier) -> tuple[float, int, int]:
            scores, member, reps = per_attack[attack]
            members = [s for s, m, r in zip(scores, member, reps, strict=True) if m and tier in (None, r)]
            controls = [s for s, m in zip(scores, member, strict=True) if not m]
            return float(stats.mannwhitneyu(members, controls, alternative=alternative).pvalue), len(members), len(controls)

        if p_value(best, "greater")[0] > level:  # the separation itself could be chance at this n
            continue
        for attack, auc in aucs.items():
            if auc > INVERTED_AUC:
                continue
            p, n_members, n_controls = p_value(attack, "less")
            if p <= level:
                found[attack].append(f"AUC {auc:.2f} on {label} ({n_members} members against {n_controls} references; "
                                     f"one-sided Mann-Whitney p = {p:.2g} <= {level:.2g}, Bonferroni over {len(aucs)} "
                                     f"attacks) where {best} has {aucs[best]:.2f}")
    for attack, where in found.items():
        out.notes[f"mia.inverted/{attack}"] = (
            f"inverted, not a result: {'; '.join(where)}. {attack} ranks members below the references that another "
            f"attack separates from them: a sign error or a degenerate score, not evidence of non-membership")


def _scope_notes(out: SuiteResult, per_attack: dict[str, tuple[list[float], list[bool], list[int]]]) -> None:
    """Say which tokens each attack read, and flag an attack that only re-orders loss (degenerate for the spec)."""
    for attack in sorted(per_attack):
        if attack in ATTACK_SCOPES:
            scope, paper_scope, paper = ATTACK_SCOPES[attack]
            out.notes[f"mia.scope/{attack}"] = (f"{scope} tokens; {paper} defines it on the {paper_scope}"
                                                + ("" if scope == paper_scope else f" (see {_other_scope(attack)})"))
    for attack, reference in (("zlib", "loss"), ("zlib_text", "loss_text")):
        if attack not in per_attack or reference not in per_attack or len(per_attack[attack][0]) != len(per_attack[reference][0]):
            continue
        agree = ordering_agreement(per_attack[attack][0], per_attack[reference][0])
        if agree >= DEGENERATE_AGREEMENT:
            out.notes[f"mia.degenerate/{attack}"] = (
                f"degenerate for this spec: {attack} orders {agree:.1%} of canary pairs as {reference} does (the zlib "
                f"length is nearly constant across these texts), so mia.auc/{attack} repeats mia.auc/{reference}; "
                + ("read mia.auc/zlib_text" if attack == "zlib" else "it adds no evidence"))


def _other_scope(attack: str) -> str:
    if attack.endswith("_text"):
        return attack.removesuffix("_text")
    if attack.endswith("_secret"):
        return attack.removesuffix("_secret")
    return f"{attack}_secret" if ATTACK_SCOPES[attack][0] == "text" else f"{attack}_text"


def _null_calibration(out: SuiteResult, scores: list[SequenceScore]) -> None:
    """The references' sampled exposure under each model against the uniform-rank null (~1/ln 2 bits)."""
    by_model: dict[str, list[SequenceScore]] = defaultdict(list)
    for s in scores:
        if s.repetitions == 0 and s.exposure is not None:  # the ranked null sample (scoring.exposure_null_references)
            by_model[s.model].append(s)
    for model, rows in sorted(by_model.items()):
        sizes = {r.n_references + 1 for r in rows}
        if len(rows) < 2 or len(sizes) != 1:
            continue
        cal = null_calibration([r.exposure for r in rows], sizes.pop(), alpha=NULL_ALPHA)
        out.put(f"exposure.null_mean/{model}", cal.mean, cal.n, cal.low, cal.high)
        out.put(f"exposure.null_p/{model}", cal.p_value, cal.n)
        out.put(f"exposure.null_biased/{model}", float(cal.biased), cal.n)
        out.notes[f"exposure.null/{model}"] = (
            f"{cal.n} never-inserted references ranked among N = {cal.space_size} secrets: mean exposure {cal.mean:.3f} "
            f"[{cal.low:.3f}, {cal.high:.3f}] bits (95% t interval); an unlearned canary averages {cal.expected:.3f} "
            f"(1/ln 2 = 1.443 as N grows); z-test p = {cal.p_value:.3g}"
            + (f" < {NULL_ALPHA:g}: BIASED, exposure thresholds do not sit against the null" if cal.biased else ""))


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
    mia_k: float = 0.2,
    inclusion: str = "split",
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

    _null_calibration(out, scores)
    per_attack = _mia(out, tuned, base_by_id, fpr_convention, mia_k)
    attack = PRIVACY_ATTACK if PRIVACY_ATTACK in per_attack else "loss"
    if attack in per_attack:
        attack_scores_, member, _ = per_attack[attack]
        m = len(attack_scores_)
        r = max(1, min(m, round(privacy_guess_fraction * m)))
        audit = one_run_audit(attack_scores_, member, k_pos=r // 2, k_neg=r - r // 2, delta=privacy_delta,
                              p_value=privacy_p_value)
        out.put("privacy.eps_lb", audit.eps_lower_bound, audit.m)
        out.put("privacy.eps_ceiling", audit.eps_ceiling, audit.guesses)
        out.put("privacy.guesses", float(audit.guesses), audit.m)
        out.put("privacy.correct", float(audit.correct), audit.guesses)
        out.notes["privacy.eps_lb"] = (
            f"one-run bound (Steinke, Nasr, Jagielski 2023) at delta={privacy_delta:g}, p={privacy_p_value:g}: {audit.correct}/"
            f"{audit.guesses} guesses right from {attack} (top {r // 2} guessed in, bottom {r - r // 2} out, fixed in advance); "
            f"{audit.guesses} guesses can show at most eps={audit.eps_ceiling:.2f}. The bound assumes each canary was "
            + ("included by an independent fair coin, as this run's were (canaries.inclusion=coin)" if inclusion == "coin"
               else "included by an independent fair coin; the harness draws a fixed member/reference split, so read it "
                    "as indicative (canaries.inclusion=coin draws the coins)")
        )
        _privacy_methods(out, attack_scores_, member, audit.guesses, audit.correct, delta=privacy_delta,
                         p_value=privacy_p_value)
    return out


def _privacy_methods(out: SuiteResult, scores: list[float], member: list[bool], guesses: int, correct: int, *,
                     delta: float, p_value: float) -> None:
    """``privacy.eps_lb/<method>`` on the same guesses as ``privacy.eps_lb``, and each method's best-of-k."""
    m = len(scores)
    for method, what in BOUND_METHODS.items():
        if method in GAUSSIAN_NULL_METHODS and delta <= 0:
            out.notes[f"privacy.eps_lb/{method}"] = "not computed: a mu-GDP null has no finite eps at delta = 0"
            continue
        out.put(f"privacy.eps_lb/{method}", epsilon_lower_bound_by(method, m, guesses, correct, delta=delta,
                                                                   p_value=p_value), m)
        out.notes[f"privacy.eps_lb/{method}"] = (f"{what}; {correct}/{guesses} guesses right of {m} canaries, "
                                                 f"delta={delta:g}, p={p_value:g}")
        if method == "xiang_eps_delta":
            continue  # within 1% of Steinke's on the reference table's rows: its best-of-k would say nothing new
        best = best_of_guess_counts(scores, member, method=method, delta=delta, p_value=p_value)
        out.put(f"privacy.eps_lb/{method}_best_k", best.eps_lower_bound, m)
        found = (f"{best.correct}/{best.guesses} right at the best count" if best.eps_lower_bound > 0
                 else "no count rejects eps = 0")
        out.notes[f"privacy.eps_lb/{method}_best_k"] = (
            f"best of {len(best.grid)} guess counts fixed in advance ({', '.join(map(str, best.grid))}), each at "
            f"p={best.level:.3g} (Bonferroni for p={p_value:g}): {found}")


def summarize_scores(scores: list[SequenceScore], section: ScoringSection, *, inclusion: str = "split",
                     tuned_label: str = "tuned") -> SuiteResult:
    """:func:`summarize_metrics` with the knobs of a recipe's ``scoring`` section (``inclusion``: ``canaries.inclusion``;
    ``tuned_label``: the model measured against the base, a release's label for :mod:`audit.pipeline.release`)."""
    return summarize_metrics(scores, tuned_label=tuned_label, fpr_convention=section.mia_fpr_convention,
                             np_queries=section.np_extraction_queries,
                             np_probability=section.np_extraction_probability, privacy_delta=section.privacy_delta,
                             privacy_p_value=section.privacy_p_value, privacy_guess_fraction=section.privacy_guess_fraction,
                             mia_k=section.mia_k, inclusion=inclusion)
