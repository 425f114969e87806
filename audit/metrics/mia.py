"""Membership inference: per-sequence attack scores and their evaluation at low false-positive rates.

Every score here is oriented **higher = more member-like**, so one threshold rule serves all of them: a sequence is
called a member when ``score >= threshold``. Inputs are the per-token natural-log probabilities of the target span
(the secret) from one teacher-forced pass, plus, for Min-K%++, the mean and variance of the log-probability over the
full vocabulary at each position (reduced on the device by :mod:`audit.score.engine`).

Attacks (one formula each; lp_t = log p(x_t | x_<t), n tokens):

* LOSS (Yeom et al. 2018, "Privacy risk in machine learning"): ``mean_t lp_t`` (= -loss).
* difference to the base model (the reference attack of Carlini et al. 2021, "Extracting training data from large
  language models"; with the base as reference, as memaudit and EZ-MIA do): ``loss_base - loss_tuned``.
* ratio to the base model (Carlini et al. 2021; the PPL ratio of Meeus et al. 2024, "Copyright traps"):
  ``-loss_tuned / loss_base``.
* zlib (Carlini et al. 2021): model bits over zlib bits, ``-(sum_t -lp_t / ln 2) / (8 len(zlib(text)))``; mimir divides
  the *mean* loss by the zlib length, which orders sequences of equal token count the same way.
* Min-K% (Shi et al. 2024, "Detecting pretraining data from large language models", ICLR): the mean of the
  ``max(1, floor(k n))`` smallest lp_t.
* Min-K%++ (Zhang et al. 2025, "Min-K%++: improved baseline for detecting pre-training data", ICLR):
  ``z_t = (lp_t - mu_t) / sigma_t`` with ``mu_t = E_{v~p_t}[log p_t(v)]`` and ``sigma_t^2 = Var_{v~p_t}[log p_t(v)]``
  over the full vocabulary, then the mean of the smallest k-fraction of z_t as in Min-K%.

* zlib as mimir computes it (``attacks/zlib.py``): mean NLL of the whole text over the byte length of its zlib
  compression, oriented ``mean_t lp_t / len(zlib(text))`` (:func:`zlib_mimir_score`).
* EZ-MIA (Ilic, Stanojevic, Cvejoski 2026, "Powerful training-free membership inference against autoregressive
  language models", arXiv 2601.12104; reference code ``JetBrains-Research/ez-mia``, ``mia/ez_score.py``): in the
  *error zone* E = {t : argmax_v p_target(v | x_<t) != x_t}, with d_t = lp_target_t - lp_reference_t (the base model
  is the reference), the paper's ratio ``r = P / N`` with ``P = sum_{t in E} max(d_t, 0)`` and
  ``N = sum_{t in E} max(-d_t, 0)``: how much more fine-tuning raised the true token where the model still gets it
  wrong than it lowered it. Reported as the sign balance ``(P - N) / (P + N) = (r - 1) / (r + 1)`` in [-1, 1], a
  strictly increasing map of r, so wherever the zone has shifts of both signs every ordering (AUC, TPR at any FPR) is
  the paper's. Deviation from the reference code, which returns 0 (the lowest ratio there is) when E has no negative
  shift or fewer than ``min_tokens`` positions: an all-positive zone (r = infinity) scores 1, the top, and a zone of
  fewer than ``min_tokens`` positions (verbatim or near-verbatim recall) scores the same balance over every scored
  token (:func:`ez_mia_score` says why).

Scope. Each attack reads either the **secret** span (memaudit and Panda et al. 2025 score only the planted span) or the
whole canary **text** (Yeom et al., Carlini et al., Shi et al., Zhang et al., mimir and EZ-MIA score whole samples);
:data:`ATTACK_SCOPES` names each attack's scope and the scope its paper defines. On a 6-token secret, Min-K% at
k = 0.2 reads ``max(1, floor(0.2 * 6)) = 1`` token, and zlib of a fixed-length digit string is a near-constant, so
zlib at secret scope orders canaries as loss does (:func:`ordering_agreement` measures it).

Evaluation: :func:`roc_auc` (Mann-Whitney, ties count 1/2) and :func:`tpr_at_fpr`, which states its FPR convention and
refuses when there are too few controls to measure the requested FPR at all.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from audit.core.errors import AuditError
from audit.metrics.stats import clopper_pearson

LN2 = math.log(2.0)
FprConvention = Literal["inclusive", "strict"]


def _arr(x: ArrayLike) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError("an attack needs at least one scored token")
    return a


def loss_score(logprobs: ArrayLike) -> float:
    """LOSS attack: mean token log-probability (= minus the mean loss)."""
    return float(np.mean(_arr(logprobs)))


def mean_loss(logprobs: ArrayLike) -> float:
    """Mean negative log-likelihood in nats per token."""
    return -loss_score(logprobs)


def difference_to_base(loss_tuned: float, loss_base: float) -> float:
    """``loss_base - loss_tuned`` (mean NLL in nats per token, :func:`mean_loss`): how much fine-tuning lowered this
    sequence's loss; higher = member (the ``loss_diff`` attacks)."""
    return loss_base - loss_tuned


def ratio_to_base(loss_tuned: float, loss_base: float) -> float | None:
    """``-loss_tuned / loss_base``: near 0 when fine-tuning drove the loss to 0, -1 when it did not change it (the
    ``loss_ratio`` attack). None when the base loss is not positive: the ratio is undefined, so the attack has no
    score for that sequence (rather than an arbitrary 0 or -inf)."""
    if loss_base <= 0.0:
        return None
    return -loss_tuned / loss_base


def zlib_ratio_score(logprobs: ArrayLike, text: str) -> float:
    """``-(model bits) / (zlib bits)`` of ``text``: low model cost for a text zlib cannot compress looks memorized."""
    model_bits = -float(np.sum(_arr(logprobs))) / LN2
    zlib_bits = 8 * len(zlib.compress(text.encode("utf-8")))
    return -model_bits / zlib_bits


def zlib_mimir_score(logprobs: ArrayLike, zlib_bytes: int) -> float:
    """mimir's zlib: ``mean_t lp_t / len(zlib(text))`` (minus the mean NLL in nats over the compressed byte count)."""
    if zlib_bytes <= 0:
        raise ValueError(f"zlib_bytes must be positive, got {zlib_bytes}")
    return loss_score(logprobs) / zlib_bytes


def zlib_bytes(text: str) -> int:
    """Byte length of ``zlib.compress`` of the UTF-8 text (the zlib attacks' denominator)."""
    return len(zlib.compress(text.encode("utf-8")))


def _shift_balance(shift: np.ndarray) -> float:
    """``(P - N) / (P + N)`` of the shifts (P the sum of the positive ones, N of the negative ones' sizes); 0 when
    every shift is 0: nothing moved, no evidence either way."""
    up, down = float(np.sum(shift[shift > 0])), float(np.sum(-shift[shift < 0]))
    return 0.0 if up + down == 0.0 else (up - down) / (up + down)


def ez_mia_score(logprobs_target: ArrayLike, logprobs_reference: ArrayLike, target_top1_correct: ArrayLike, *,
                 min_tokens: int = 2) -> float:
    """EZ-MIA's error-zone score (module docstring) as the sign balance ``(P - N) / (P + N)`` in [-1, 1].

    Why it deviates from the reference code (``mia/attack.py`` maps its non-finite ratios to 0 with
    ``np.nan_to_num(posinf=0.0)``; ``error_zone_pos_neg_sum_ratio`` returns 0 for the cases below). On the paper's
    128-token natural texts the zone always holds shifts of both signs and those zeros never occur. On a memorized
    canary they are the rule: the tuned model has raised every token it still gets wrong (N = 0, r = infinity, the
    strongest member signal there is) or gets every token right (verbatim recall, no zone), and the reference code
    scores both 0, below every reference canary, so the attack ranked the most memorized canaries as the least likely
    members (AUC 0.00 on the 16x tier of ``tiny/lora_cpu``). Here:

    * an all-positive zone scores 1 and an all-negative one -1: the limits of ``(r - 1) / (r + 1)``;
    * a zone of fewer than ``min_tokens`` positions is too small to weigh on its own (the paper's rule), so the same
      balance is taken over every scored token: what fine-tuning did to the text the model now recalls, still against
      the reference. A text only the tuned model recalls scores near 1 (tuning raised nearly every token), one the
      base already recalled by whatever its small shifts say: verbatim recall is not evidence against membership,
      and a canary whose all-positive zone empties as it is learned stays near the top (1, then the whole text's
      balance): 0.98-1.00 for the 16x canaries of ``tiny/lora_cpu training.epochs=20``, references 0.20-0.60;
    * the ordering of every sequence whose zone has shifts of both signs is the paper's (a strictly increasing map).
    """
    lp_t = np.asarray(logprobs_target, dtype=np.float64).ravel()  # may be empty: nothing scored, score 0
    lp_r = np.asarray(logprobs_reference, dtype=np.float64).ravel()
    hit = np.asarray(target_top1_correct, dtype=bool).ravel()
    if not lp_t.shape == lp_r.shape == hit.shape:
        raise ValueError(f"target {lp_t.shape}, reference {lp_r.shape} and top-1 flags {hit.shape} must have one shape")
    shift = lp_t - lp_r
    zone = shift[~hit]
    return _shift_balance(zone if zone.size >= min_tokens else shift)


def ordering_agreement(scores_a: ArrayLike, scores_b: ArrayLike) -> float:
    """Share of pairs two attacks order the same way, ``(1 + tau_b) / 2`` (Kendall): 1.0 means the same ROC curve."""
    a, b = _arr(scores_a), _arr(scores_b)
    if a.shape != b.shape:
        raise ValueError(f"scores {a.shape} and {b.shape} must have one shape")
    if a.size < 2:
        return 1.0
    tau = stats.kendalltau(a, b).statistic
    return 1.0 if not math.isfinite(tau) else (1.0 + float(tau)) / 2.0


def _lowest_fraction_mean(values: np.ndarray, k: float) -> float:
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must lie in (0, 1], got {k}")
    count = max(1, int(math.floor(k * values.size)))
    return float(np.mean(np.sort(values)[:count]))


def min_k_score(logprobs: ArrayLike, *, k: float = 0.2) -> float:
    """Min-K%: mean of the ``max(1, floor(k n))`` lowest token log-probabilities."""
    return _lowest_fraction_mean(_arr(logprobs), k)


def min_k_plus_plus_score(logprobs: ArrayLike, vocab_mean: ArrayLike, vocab_var: ArrayLike, *, k: float = 0.2) -> float:
    """Min-K%++: Min-K% over ``(lp_t - mu_t) / sigma_t`` (full-vocabulary mean and variance of log p at step t)."""
    lp, mu, var = _arr(logprobs), _arr(vocab_mean), _arr(vocab_var)
    if not lp.shape == mu.shape == var.shape:
        raise ValueError(f"logprobs {lp.shape}, vocab_mean {mu.shape} and vocab_var {var.shape} must have one shape")
    z = (lp - mu) / np.sqrt(np.maximum(var, 1e-12))
    return _lowest_fraction_mean(z, k)


Scope = Literal["secret", "text"]

ATTACK_SCOPES: dict[str, tuple[Scope, Scope, str]] = {
    # attack: (scope it reads, scope its paper defines, the paper)
    "loss": ("secret", "text", "Yeom et al. 2018"),
    "loss_text": ("text", "text", "Yeom et al. 2018"),
    "zlib": ("secret", "text", "Carlini et al. 2021 (model bits over zlib bits)"),
    "zlib_text": ("text", "text", "Carlini et al. 2021 as mimir computes it (mean NLL over zlib bytes)"),
    "min_k": ("secret", "text", "Shi et al. 2024"),
    "min_k_text": ("text", "text", "Shi et al. 2024"),
    "min_k_pp": ("secret", "text", "Zhang et al. 2025"),
    "min_k_pp_text": ("text", "text", "Zhang et al. 2025"),
    "loss_diff": ("secret", "text", "Carlini et al. 2021 reference attack, base as reference"),
    "loss_diff_text": ("text", "text", "Carlini et al. 2021 reference attack, base as reference"),
    "loss_ratio": ("secret", "text", "Carlini et al. 2021; Meeus et al. 2024"),
    "min_k_pp_diff": ("secret", "secret", "memaudit (Min-K%++ calibrated by the base model, secret span)"),
    "min_k_pp_diff_text": ("text", "secret", "memaudit (Min-K%++ calibrated by the base model)"),
    "ez_mia": ("text", "text", "Ilic et al. 2026"),
    "ez_mia_secret": ("secret", "text", "Ilic et al. 2026"),
}
"""Every attack the suite reports, the tokens it reads and the scope its paper defines. The bare names
(``loss``, ``zlib``, ...) keep the secret scope their metric keys always had; ``_text`` / ``_secret`` name the other."""


# ------------------------------------------------------------------------------------------------ evaluation


def roc_auc(member_scores: ArrayLike, nonmember_scores: ArrayLike) -> float:
    """Area under the ROC curve = P(member score > non-member score) + P(tie) / 2 (Mann-Whitney U / (n1 n0))."""
    m, n = _arr(member_scores), _arr(nonmember_scores)
    ranks = stats.rankdata(np.concatenate([m, n]))  # average ranks: ties count half
    u = float(np.sum(ranks[: m.size])) - m.size * (m.size + 1) / 2.0
    return u / (m.size * n.size)


class InsufficientControlsError(AuditError):
    """TPR at a false-positive rate that the number of controls cannot resolve."""

    def __init__(self, problem: str, *, fix: str, needed: int, n_controls: int) -> None:
        super().__init__(problem, fix=fix)
        self.needed = needed
        self.n_controls = n_controls


@dataclass(frozen=True)
class TprAtFpr:
    tpr: float
    low: float
    high: float
    """Clopper-Pearson interval on the TPR (members are the trials)."""
    confidence: float
    threshold: float
    """Members are called at ``score > threshold`` (the largest control score that had to be excluded)."""
    achieved_fpr: float
    fpr_target: float
    convention: FprConvention
    n_members: int
    n_controls: int
    allowed_false_positives: int


def allowed_false_positives(n_controls: int, fpr: float, convention: FprConvention) -> int:
    """How many controls may score above the threshold: ``floor(fpr n)`` (inclusive) or ``ceil(fpr n) - 1`` (strict)."""
    exact = fpr * n_controls
    if convention == "inclusive":
        return int(math.floor(exact + 1e-9))
    if convention == "strict":
        return int(math.ceil(exact - 1e-9)) - 1
    raise ValueError(f"convention must be 'inclusive' or 'strict', got {convention!r}")


def tpr_at_fpr(
    member_scores: ArrayLike,
    nonmember_scores: ArrayLike,
    fpr: float,
    *,
    convention: FprConvention = "inclusive",
    confidence: float = 0.95,
) -> TprAtFpr:
    """True-positive rate at the most permissive threshold whose empirical FPR meets ``fpr``.

    FPR convention: the empirical FPR is the fraction of controls (non-members) scoring above the threshold.
    ``"inclusive"`` requires ``FPR <= fpr`` (ml_privacy_meter); ``"strict"`` requires ``FPR < fpr`` (mimir). The
    threshold sits at the (j+1)-th largest control score, j being the allowed false positives, and members must
    score strictly above it, so ties with that control count as misses (no randomized threshold).

    Refusal: if not even one false positive is allowed (``n_controls < 1 / fpr`` inclusive, ``<= 1 / fpr`` strict),
    the measurement would be TPR at 0% FPR, a different quantity, so :class:`InsufficientControlsError` is raised.
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must lie in (0, 1), got {fpr}")
    members, controls = _arr(member_scores), _arr(nonmember_scores)
    allowed = allowed_false_positives(controls.size, fpr, convention)
    if allowed < 1:
        need = math.ceil(1 / fpr - 1e-9) + (1 if convention == "strict" else 0)
        raise InsufficientControlsError(
            f"TPR at {fpr:.3g} FPR needs at least {need} controls ({convention} FPR convention), got {controls.size}: "
            f"with fewer, no control may score above the threshold and the number measures 0% FPR instead",
            fix=f"add non-member controls (canaries.references >= {need}) or ask for a larger FPR",
            needed=need, n_controls=int(controls.size),
        )
    desc = np.sort(controls)[::-1]
    threshold = float(desc[allowed]) if allowed < controls.size else -math.inf
    tp = int(np.count_nonzero(members > threshold))
    fp = int(np.count_nonzero(controls > threshold))
    prop = clopper_pearson(tp, members.size, confidence=confidence)
    return TprAtFpr(tpr=prop.rate, low=prop.low, high=prop.high, confidence=confidence, threshold=threshold,
                    achieved_fpr=fp / controls.size, fpr_target=fpr, convention=convention, n_members=members.size,
                    n_controls=controls.size, allowed_false_positives=allowed)
