"""Exposure (Carlini, Liu, Erlingsson, Kos, Song 2019, "The Secret Sharer", USENIX Security; arXiv 1802.08232).

For a canary with secret s from a randomness space R, let Px(r) = -log2 Pr(prefix + r | model) over the secret's
tokens (any monotone loss works: tensorflow/privacy passes mean per-token cross-entropy). The rank of s is its
position among R sorted by Px (1 = most likely), and

    exposure(s) = log2 |R| - log2 rank(s).

Rank convention (the paper's, used throughout the harness): R includes the canary and ties count against it,

    rank(s) = 1 + |{ r in R, r != s : Px(r) <= Px(s) }|,

so exposure lies in [0, log2 |R|]. Three ways to get the rank:

* **exact**: R is enumerated (a 6-digit PIN: |R| = 10^6). :mod:`audit.score.exposure_search` walks the candidate
  trie with branch-and-bound pruning, so the cost grows with the canary's rank, not with |R|.
* **sampled** (:func:`exposure_interpolation`): R is replaced by n reference secrets drawn uniformly from the space
  plus the canary, |R| = n + 1, so exposure is at most log2(n + 1). :func:`sampled_space_exposure` turns the same
  count into an estimate of the exposure over the *whole* space, with an exact binomial interval.
* **extrapolated** (:func:`exposure_extrapolation`): fit a skew-normal to the reference losses and read the
  canary's tail probability, exposure = -log2 CDF(Px(s)). The left tail of a skew-normal collapses fast, so the
  value is capped at log2 |space| and flagged when capped.

tensorflow/privacy (``secret_sharer/exposures.py``) computes the same rank but divides by the number of references
only (|R| = n, the canary excluded), so its exposure can dip below 0; ``convention="tf_privacy"`` reproduces it
exactly. A canary the model never learned has a uniform rank, and its exposure averages
log2 N - log2(N!)/N, about 1/ln 2 = 1.44 bits (:func:`null_exposure_mean`): that is the null, not 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from audit.metrics.stats import clopper_pearson

K = TypeVar("K")
Convention = Literal["paper", "tf_privacy"]


def rank_against_references(canary_nll: float, reference_nll: ArrayLike) -> int:
    """1 + number of references at least as likely as the canary (NLL <=), ties counting against it."""
    refs = np.asarray(reference_nll, dtype=np.float64)
    return 1 + int(np.count_nonzero(refs <= canary_nll))


def exposure_from_rank(rank: int, space_size: int) -> float:
    """``log2(space_size) - log2(rank)``; ``space_size`` counts the canary itself."""
    if not 1 <= rank <= space_size:
        raise ValueError(f"rank {rank} must lie in [1, {space_size}]")
    return math.log2(space_size) - math.log2(rank)


def null_exposure_mean(space_size: int) -> float:
    """E[exposure] of a canary whose rank is uniform on 1..N: log2 N - log2(N!)/N -> 1/ln 2 as N grows."""
    if space_size < 1:
        raise ValueError("space_size must be >= 1")
    return math.log2(space_size) - math.lgamma(space_size + 1) / math.log(2) / space_size


def _interpolate(values: np.ndarray, sorted_refs: np.ndarray, convention: Convention) -> np.ndarray:
    ranks = 1 + np.searchsorted(sorted_refs, values, side="right")  # references with loss <= the canary's
    size = len(sorted_refs) + (1 if convention == "paper" else 0)
    return np.log2(size) - np.log2(ranks)


def exposure_interpolation(
    perplexities: dict[K, ArrayLike] | ArrayLike,
    perplexities_reference: ArrayLike,
    *,
    convention: Convention = "paper",
) -> dict[K, np.ndarray] | np.ndarray:
    """Exposure of each secret from its rank among reference losses (the sampled "interpolation" estimate).

    ``perplexities`` is an array of canary losses, or tensorflow/privacy's shape ``{key: [losses]}`` (returned with
    the same keys). ``rank = 1 + #{references with loss <= canary loss}``; other canaries never count.
    ``convention="paper"`` uses |R| = n_references + 1 (range [0, log2(n+1)]); ``"tf_privacy"`` uses
    |R| = n_references, as ``compute_exposure_interpolation`` does.
    """
    if convention not in ("paper", "tf_privacy"):
        raise ValueError(f"convention must be 'paper' or 'tf_privacy', got {convention!r}")
    refs = np.sort(np.asarray(perplexities_reference, dtype=np.float64).ravel())
    if refs.size == 0:
        raise ValueError("at least one reference loss is needed")
    if isinstance(perplexities, dict):
        return {k: _interpolate(np.asarray(v, dtype=np.float64), refs, convention) for k, v in perplexities.items()}
    return _interpolate(np.asarray(perplexities, dtype=np.float64), refs, convention)


@dataclass(frozen=True)
class ExtrapolatedExposure:
    """Skew-normal extrapolated exposure; ``capped[i]`` marks values clipped to ``log2(space_size)``."""

    exposure: np.ndarray
    capped: np.ndarray
    skewnorm_params: tuple[float, float, float]
    """(shape a, loc, scale) fitted to the reference losses."""


def fit_skewnorm(perplexities_reference: ArrayLike) -> tuple[float, float, float]:
    """Maximum-likelihood skew-normal fit (scipy), as tensorflow/privacy does."""
    refs = np.asarray(perplexities_reference, dtype=np.float64).ravel()
    if refs.size < 3:
        raise ValueError("a skew-normal fit needs at least 3 reference losses")
    a, loc, scale = stats.skewnorm.fit(refs)
    return float(a), float(loc), float(scale)


def _extrapolate(values: np.ndarray, params: tuple[float, float, float], space_size: int | None) -> ExtrapolatedExposure:
    with np.errstate(divide="ignore"):
        raw = -np.log2(stats.skewnorm.cdf(values, *params))
    capped = np.zeros(raw.shape, dtype=bool)
    if space_size is not None:
        cap = math.log2(space_size)
        capped = raw > cap
        raw = np.minimum(raw, cap)
    return ExtrapolatedExposure(exposure=raw, capped=capped, skewnorm_params=params)


def exposure_extrapolation(
    perplexities: dict[K, ArrayLike] | ArrayLike,
    perplexities_reference: ArrayLike,
    *,
    space_size: int | None = None,
) -> dict[K, ExtrapolatedExposure] | ExtrapolatedExposure:
    """Exposure by skew-normal extrapolation: ``-log2 SkewNormCDF(loss; fit(references))`` (Carlini et al. 2019 §4.3).

    Uncapped (``space_size=None``) it equals tensorflow/privacy's ``compute_exposure_extrapolation``. With
    ``space_size`` every value is capped at ``log2(space_size)``, the most a secret from that space can carry, and
    flagged: a far-left tail gives hundreds of bits otherwise.
    """
    params = fit_skewnorm(perplexities_reference)
    if isinstance(perplexities, dict):
        return {k: _extrapolate(np.asarray(v, dtype=np.float64), params, space_size) for k, v in perplexities.items()}
    return _extrapolate(np.asarray(perplexities, dtype=np.float64), params, space_size)


@dataclass(frozen=True)
class SpaceExposureEstimate:
    """Exposure over the whole space estimated from a sampled rank, with an exact binomial interval."""

    exposure: float
    low: float
    high: float
    confidence: float
    estimated_rank: float


def sampled_space_exposure(rank: int, n_references: int, space_size: int, *, confidence: float = 0.95) -> SpaceExposureEstimate:
    """Estimate ``log2|S| - log2 rank_S`` from a rank among ``n_references`` uniform draws from the space S.

    ``k = rank - 1`` references beat the canary, so the fraction f of the (other) secrets that beat it is a binomial
    proportion k/n with Clopper-Pearson interval [f_lo, f_hi]; the space rank is ``1 + f (|S| - 1)``. The interval
    on exposure is ``[log2|S| - log2(1 + f_hi(|S|-1)), log2|S| - log2(1 + f_lo(|S|-1))]``: with k = 0 the upper end
    is log2|S| (a sample cannot rule out rank 1).
    """
    if not 1 <= rank <= n_references + 1:
        raise ValueError(f"rank {rank} must lie in [1, {n_references + 1}]")
    if space_size < n_references + 1:
        raise ValueError(f"space_size {space_size} is smaller than the {n_references + 1} secrets ranked")
    prop = clopper_pearson(rank - 1, n_references, confidence=confidence)
    top = math.log2(space_size)

    def at(f: float) -> float:
        return top - math.log2(1.0 + f * (space_size - 1))

    est_rank = 1.0 + prop.rate * (space_size - 1)
    return SpaceExposureEstimate(exposure=at(prop.rate), low=at(prop.high), high=at(prop.low), confidence=confidence,
                                 estimated_rank=est_rank)


@dataclass(frozen=True)
class NullCalibration:
    """Exposure of canaries the model never saw, tested against the uniform-rank null (see :func:`null_calibration`)."""

    mean: float
    low: float
    high: float
    """``confidence`` Student-t interval on the mean."""
    n: int
    expected: float
    """E[exposure] under the null, ``log2 N - log2(N!)/N`` (1/ln 2 = 1.4427 as N grows)."""
    p_value: float
    """Two-sided z-test of the mean against ``expected``, with the null's exact variance."""
    biased: bool
    """``p_value < alpha``: the references' exposure is not what an unlearned canary has."""
    space_size: int
    confidence: float
    alpha: float


def null_exposure_variance(space_size: int) -> float:
    """Var[exposure] of a uniform rank on 1..N: the variance of log2(rank); (1/ln 2)^2 = 2.08 in the limit."""
    if space_size < 1:
        raise ValueError("space_size must be >= 1")
    if space_size > 10**7:  # -log2 U with U uniform: exponential with rate ln 2
        return 1.0 / math.log(2) ** 2
    logs = np.log2(np.arange(1, space_size + 1, dtype=np.float64))
    return float(np.var(logs))


def null_calibration(exposures: ArrayLike, space_size: int, *, confidence: float = 0.95,
                     alpha: float = 0.01) -> NullCalibration:
    """Is the references' exposure the null's? Mean with a t interval, and a z-test against the uniform-rank mean.

    A canary the model never learned ranks uniformly among the ``space_size`` secrets it is compared with (itself
    included), so its exposure has mean ``log2 N - log2(N!)/N`` and the variance of ``log2(rank)`` (both exact for the
    discrete rank). The mean of n references is tested with ``z = (mean - E) / sqrt(Var / n)`` (normal by the central
    limit theorem; the exposure's distribution is close to exponential, so n >= 30 makes the p-value accurate to a
    few percent). ``biased`` flags ``p < alpha``: a template prefix the base model already completes, references
    drawn from another distribution than the members, or a scoring bug, all of which make exposure thresholds
    meaningless.
    """
    x = np.asarray(exposures, dtype=np.float64).ravel()
    if x.size < 2:
        raise ValueError(f"a null calibration needs at least 2 reference exposures, got {x.size}")
    if not 0.0 < confidence < 1.0 or not 0.0 < alpha < 1.0:
        raise ValueError(f"confidence ({confidence}) and alpha ({alpha}) must lie in (0, 1)")
    expected, var = null_exposure_mean(space_size), null_exposure_variance(space_size)
    mean = float(np.mean(x))
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * np.std(x, ddof=1) / math.sqrt(x.size))
    z = (mean - expected) / math.sqrt(var / x.size) if var > 0 else 0.0
    p = float(2.0 * stats.norm.sf(abs(z)))
    return NullCalibration(mean=mean, low=mean - half, high=mean + half, n=int(x.size), expected=expected, p_value=p,
                           biased=p < alpha, space_size=space_size, confidence=confidence, alpha=alpha)
