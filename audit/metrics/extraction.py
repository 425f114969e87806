"""Extraction: can the secret be read back out of the model?

Three protocols, all over token ids (never decoded text, so whitespace and BPE quirks cannot blur a match):

* **Discoverable extraction** (Carlini et al. 2023, "Quantifying memorization across neural language models", ICLR):
  prompt with the canary's prefix (optionally plus the first fraction of the secret, as memaudit does with 25% and
  50%), decode greedily, and compare the continuation c with the remaining secret tokens s:
  exact match ``c[:|s|] == s``; longest common prefix ``lcp(c, s)`` in tokens; normalized edit distance
  ``lev(c[:|s|], s) / |s|`` (0 = identical, 1 = nothing in common).
* **Probabilistic (n, p) extraction** (Hayes, Swanberg, Chaudhari, Yona, Shumailov, Nasr, Choquette-Choo, Lee,
  Cooper 2025, "Measuring memorization in language models via probabilistic extraction", NAACL; arXiv 2410.19482):
  with the per-query success probability ``p_z = prod_t p(s_t | prefix, s_<t)`` under sampling at temperature 1
  (read from the same teacher-forced pass), the secret is (n, p)-extractable when ``1 - (1 - p_z)^n >= p``; the
  number of queries needed is ``n* = ceil(log(1 - p) / log(1 - p_z))``.
* **Sampled extraction**: draw N samples after the prefix and count exact matches, a Monte-Carlo check of p_z under
  the sampler actually used (:func:`audit.metrics.stats.clopper_pearson` gives its interval).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def longest_common_prefix(generated: Sequence[int], target: Sequence[int]) -> int:
    """Number of leading tokens ``generated`` and ``target`` share."""
    n = 0
    for a, b in zip(generated, target, strict=False):
        if a != b:
            break
        n += 1
    return n


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance (insert, delete, substitute each cost 1), two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        cur = [i]
        for j, y in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def normalized_edit_distance(generated: Sequence[int], target: Sequence[int]) -> float:
    """``lev(generated[:|target|], target) / |target|``: 0 for a verbatim copy, 1 for nothing in common."""
    if not target:
        raise ValueError("the target must have at least one token")
    return edit_distance(list(generated[: len(target)]), list(target)) / len(target)


@dataclass(frozen=True)
class DiscoverableMatch:
    exact: bool
    lcp_tokens: int
    normalized_edit_distance: float


def discoverable_match(generated: Sequence[int], target: Sequence[int]) -> DiscoverableMatch:
    """Compare a greedy continuation with the secret tokens it should reproduce."""
    return DiscoverableMatch(exact=list(generated[: len(target)]) == list(target),
                             lcp_tokens=longest_common_prefix(generated, target),
                             normalized_edit_distance=normalized_edit_distance(generated, target))


def extraction_probability(p_z: float, n: int) -> float:
    """``1 - (1 - p_z)^n``: the chance that at least one of n independent samples reproduces the secret."""
    if not 0.0 <= p_z <= 1.0:
        raise ValueError(f"p_z must lie in [0, 1], got {p_z}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if p_z == 1.0:
        return 1.0 if n > 0 else 0.0
    return -math.expm1(n * math.log1p(-p_z))


def queries_needed(p_z: float, p: float) -> float:
    """Smallest n with ``1 - (1 - p_z)^n >= p`` (``inf`` when p_z = 0)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if not 0.0 <= p_z <= 1.0:
        raise ValueError(f"p_z must lie in [0, 1], got {p_z}")
    if p_z == 0.0:
        return math.inf
    if p_z == 1.0:
        return 1.0
    n = math.ceil(math.log1p(-p) / math.log1p(-p_z) - 1e-12)
    return float(max(1, n))


def is_np_extractable(p_z: float, *, n: int, p: float) -> bool:
    """Hayes et al.'s (n, p)-extractability."""
    return extraction_probability(p_z, n) >= p


