"""Exposure (Carlini, Liu, Erlingsson, Kos, Song 2019, "The Secret Sharer", USENIX Security).

For a canary with secret s from a randomness space R, let Px(r) = -log2 Pr(prefix + r | model) over the
secret's tokens. The rank of s is its position among R sorted by Px (1 = most likely), and

    exposure(s) = log2 |R| - log2 rank(s).

Rank convention used here (the paper's): R includes the canary, and ties count against it,

    rank(s) = 1 + |{ r in R, r != s : Px(r) <= Px(s) }|,

so exposure lies in [0, log2 |R|]. When R is sampled (n reference secrets drawn uniformly from the space),
|R| = n + 1. A canary the model never learned has a uniform rank, and its exposure averages about
1/ln 2 = 1.44 bits: that is the null, not 0.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike


def rank_against_references(canary_nll: float, reference_nll: ArrayLike) -> int:
    """1 + number of references at least as likely as the canary (NLL <=), ties counting against it."""
    refs = np.asarray(reference_nll, dtype=np.float64)
    return 1 + int(np.count_nonzero(refs <= canary_nll))


def exposure_from_rank(rank: int, space_size: int) -> float:
    """``log2(space_size) - log2(rank)``; ``space_size`` counts the canary itself."""
    if not 1 <= rank <= space_size:
        raise ValueError(f"rank {rank} must lie in [1, {space_size}]")
    return math.log2(space_size) - math.log2(rank)
