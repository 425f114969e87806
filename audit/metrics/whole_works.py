"""Whole-work memorization: how much of a work the weights carry, and how faithfully it comes back out.

The two dimensions of Franceschelli, Cevenini & Musolesi (2024): **stored information** (bits) and **reconstruction
fidelity** (how much of the work a prompt brings back verbatim). Arrays in, numbers out; no model, no text but the
one a compressor reads.

**The window scan** (Cooper et al. 2025, "Extracting memorized pieces of (copyrighted) books from open-weight
language models", arXiv 2505.12546): every window of ``P + S`` tokens of a work, starting every ``stride`` tokens
(:func:`window_starts`), is scored teacher-forced, the window alone (no earlier context). With the suffix tokens
s_1..s_S after the prefix,

    ln p_z = sum_t ln p(s_t | prefix, s_<t)        (temperature 1, read from one teacher-forced pass)
    greedy  = every s_t is the argmax of its step   (greedy decoding of the prefix reproduces the suffix)

A window is **(n, p)-extractable** (Hayes et al. 2025, "Measuring memorization in language models via probabilistic
extraction", NAACL) when ``1 - (1 - p_z)^n >= p``, i.e. ``ln p_z >= ln(1 - (1 - p)^(1/n))``: the threshold form
(:func:`extraction_log_threshold`) keeps a 50-token suffix's p_z, often below 1e-300, out of floating point.
Per work: the share of windows that are extractable or greedy, the share of *tokens* (a token counts when a window
covering it in its suffix is extractable; the denominator is every token some suffix covers, i.e. all but the first
``P``), and the longest run of tokens that flagged windows cover, stitched where their suffixes touch or overlap
(:func:`longest_run`). Extraction grows with repetitions and with context length (Carlini et al. 2023, "Quantifying
memorization across neural language models", ICLR): the recipe's copies and ``P`` are the two knobs.

**Code length** (Deletang et al. 2024, "Language modeling is compression"): the work costs ``sum_t -log2 p(x_t | ...)``
bits; each token t >= 1 is coded by the window that gives it the longest context (:func:`context_owner`), so with
``stride <= S`` every token after the first has between ``min(t, P)`` and ``P + S - 1`` tokens of context and is
counted once (token 0 has no context and costs nothing here: < 0.1% of a work of thousands of tokens). Compared
with the raw UTF-8 size (8 bits per byte) and with ``lzma`` at its strongest preset, the data-dependent floor a
general-purpose compressor reaches (:func:`code_length`).

**Stored bits** (Morris et al. 2025, "How much do language models memorize?", arXiv 2505.24832): memorization of a
text is its code length under a reference model minus its code length under the trained model; here the reference
is the base, so ``stored = bits_base - bits_tuned``. Summed over the member works and divided by the trainable
parameters it sits beside Morris et al.'s capacity, about 3.6 bits per parameter (:data:`MORRIS_BITS_PER_PARAM`).
Held-out works of the same source are the control: what tuning on neighbouring text gives for free.
"""

from __future__ import annotations

import lzma
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

LN2 = math.log(2.0)
MORRIS_BITS_PER_PARAM = 3.6
"""Morris et al. 2025: GPT-style models store about 3.6 bits per parameter (their measured capacity)."""


# --------------------------------------------------------------------------------------------------- windows


def window_starts(n_tokens: int, *, prefix: int, suffix: int, stride: int) -> np.ndarray:
    """Start token of every window: ``0, stride, 2 stride, ...`` while a whole window fits, plus one window ending at
    the work's last token when the stride does not land there (so the tail is scanned too).

    ``stride <= suffix``: every token after the first ``prefix`` lies in some window's suffix (a larger stride would
    skip tokens that were never tested). Raises ``ValueError`` for a work shorter than one window.
    """
    if prefix < 1 or suffix < 1:
        raise ValueError(f"prefix ({prefix}) and suffix ({suffix}) must be at least 1 token")
    if not 1 <= stride <= suffix:
        raise ValueError(f"stride must lie in [1, suffix={suffix}], got {stride}")
    width = prefix + suffix
    if n_tokens < width:
        raise ValueError(f"a work of {n_tokens} tokens is shorter than one window of {width}")
    starts = np.arange(0, n_tokens - width + 1, stride, dtype=np.int64)
    if starts[-1] != n_tokens - width:
        starts = np.append(starts, n_tokens - width)
    return starts


def extraction_log_threshold(*, n: int, p: float) -> float:
    """``ln`` of the smallest p_z with ``1 - (1 - p_z)^n >= p``: ``ln(1 - (1 - p)^(1/n))``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    return math.log(-math.expm1(math.log1p(-p) / n))


def np_extractable(logp_z: ArrayLike, *, n: int, p: float) -> np.ndarray:
    """Per window: (n, p)-extractable (Hayes et al. 2025), from ``ln p_z``."""
    return np.asarray(logp_z, dtype=np.float64) >= extraction_log_threshold(n=n, p=p)


def suffix_logp_z(logprobs: ArrayLike, *, prefix: int) -> np.ndarray:
    """``ln p_z`` per window from its teacher-forced log-probabilities (rows: windows; column j scores token j + 1)."""
    lp = np.asarray(logprobs, dtype=np.float64)
    return lp[:, prefix - 1 :].sum(axis=1)


def suffix_greedy(top1: ArrayLike, *, prefix: int) -> np.ndarray:
    """Per window: every suffix token is its step's argmax (greedy decoding reproduces the suffix)."""
    return np.asarray(top1, dtype=bool)[:, prefix - 1 :].all(axis=1)


def context_owner(starts: ArrayLike, n_tokens: int, *, width: int) -> np.ndarray:
    """For each token t of the work, the window that scores it with the longest context (-1 for token 0).

    Window i scores tokens ``starts[i] + 1 .. starts[i] + width - 1`` with ``t - starts[i]`` tokens before it; the
    longest context is the earliest start ``>= t - width + 1``.
    """
    s = np.asarray(starts, dtype=np.int64)
    t = np.arange(n_tokens, dtype=np.int64)
    owner = np.searchsorted(s, t - width + 1, side="left")
    valid = (t >= 1) & (owner < len(s))
    valid[valid] &= s[owner[valid]] <= t[valid] - 1
    if not valid[1:].all():
        raise ValueError("the windows do not cover every token after the first")
    return np.where(valid, owner, -1)


def code_bits_per_window(starts: ArrayLike, logprobs: ArrayLike, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``(bits, tokens)`` per window: the code length of the tokens each window owns (:func:`context_owner`), so the
    work's code length is ``bits.sum()`` over ``tokens.sum() == n_tokens - 1`` tokens."""
    lp = np.asarray(logprobs, dtype=np.float64)
    s = np.asarray(starts, dtype=np.int64)
    owner = context_owner(s, n_tokens, width=lp.shape[1] + 1)
    t = np.arange(1, n_tokens)
    o = owner[1:]
    nats = -lp[o, t - s[o] - 1]
    bits = np.bincount(o, weights=nats, minlength=len(s)) / LN2
    return bits, np.bincount(o, minlength=len(s)).astype(np.int64)


# --------------------------------------------------------------------------------------------------- per work


def token_cover(starts: ArrayLike, flags: ArrayLike, *, prefix: int, suffix: int, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``(any, flagged)``: per token, whether some window's suffix covers it, and whether a flagged one does."""
    s = np.asarray(starts, dtype=np.int64)
    f = np.asarray(flags, dtype=bool)

    def cover(chosen: np.ndarray) -> np.ndarray:
        diff = np.zeros(n_tokens + 1, dtype=np.int64)
        np.add.at(diff, chosen + prefix, 1)
        np.add.at(diff, chosen + prefix + suffix, -1)
        return np.cumsum(diff[:-1]) > 0

    return cover(s), cover(s[f])


def longest_run(mask: ArrayLike) -> int:
    """Length of the longest stretch of True in a boolean token mask."""
    m = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]])
    edges = np.flatnonzero(m[1:] != m[:-1])
    return int((edges[1::2] - edges[::2]).max()) if len(edges) else 0


@dataclass(frozen=True)
class WorkExtraction:
    """One work under one model: how faithfully it comes back out."""

    windows: int
    extractable_windows: int
    greedy_windows: int
    extractable_share: float
    """(n, p)-extractable windows / windows."""
    greedy_share: float
    extractable_token_share: float
    """Tokens covered by an extractable window's suffix / tokens covered by any suffix."""
    greedy_token_share: float
    longest_greedy_run: int
    """Tokens in the longest stretch that greedy windows reproduce, their suffixes stitched."""
    longest_extractable_run: int


def work_extraction(starts: ArrayLike, logp_z: ArrayLike, greedy: ArrayLike, *, prefix: int, suffix: int, n_tokens: int,
                    n: int, p: float) -> WorkExtraction:
    """The extraction side of one work's scan (see the module docstring)."""
    ext = np_extractable(logp_z, n=n, p=p)
    gr = np.asarray(greedy, dtype=bool)
    if len(ext) == 0:
        raise ValueError("a work needs at least one window")
    any_cover, ext_cover = token_cover(starts, ext, prefix=prefix, suffix=suffix, n_tokens=n_tokens)
    _, gr_cover = token_cover(starts, gr, prefix=prefix, suffix=suffix, n_tokens=n_tokens)
    covered = int(any_cover.sum())
    return WorkExtraction(
        windows=len(ext), extractable_windows=int(ext.sum()), greedy_windows=int(gr.sum()),
        extractable_share=float(ext.mean()), greedy_share=float(gr.mean()),
        extractable_token_share=float(ext_cover.sum() / covered), greedy_token_share=float(gr_cover.sum() / covered),
        longest_greedy_run=longest_run(gr_cover), longest_extractable_run=longest_run(ext_cover))


def lzma_bits(text: str) -> int:
    """Size in bits of ``text`` (UTF-8) under ``lzma`` at its strongest preset (9 | EXTREME), header included."""
    return 8 * len(lzma.compress(text.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))


@dataclass(frozen=True)
class CodeLength:
    """One work under one model: how much information the model needs to write it down."""

    bits: float
    tokens: int
    """Tokens coded (all but the first)."""
    bytes: int
    """UTF-8 bytes of the work."""
    bits_per_byte: float
    ratio_raw: float
    """bits / (8 * bytes): 1.0 is no better than raw UTF-8."""
    lzma_bits: int
    ratio_lzma: float
    """bits / lzma bits: below 1 the model codes the work better than a general-purpose compressor."""


def code_length(bits: float, tokens: int, text: str) -> CodeLength:
    """The model's code length for ``text`` beside its raw size and its ``lzma`` size."""
    size = len(text.encode("utf-8"))
    if size == 0:
        raise ValueError("cannot compute the code length of an empty work")
    floor = lzma_bits(text)
    return CodeLength(bits=float(bits), tokens=int(tokens), bytes=size, bits_per_byte=float(bits) / size,
                      ratio_raw=float(bits) / (8 * size), lzma_bits=floor, ratio_lzma=float(bits) / floor)


def stored_bits(bits_base: float, bits_tuned: float) -> float:
    """Morris et al.'s memorization with the base as reference: ``bits_base - bits_tuned`` (same tokens)."""
    return float(bits_base) - float(bits_tuned)


def stored_bits_per_parameter(stored_total: float, trainable_params: int) -> float:
    """Stored bits over the parameters training changed; compare with :data:`MORRIS_BITS_PER_PARAM`."""
    if trainable_params <= 0:
        raise ValueError(f"trainable_params must be positive, got {trainable_params}")
    return float(stored_total) / trainable_params


# --------------------------------------------------------------------------------------------------- over works


@dataclass(frozen=True)
class MeanOverWorks:
    """The mean of a per-work number over ``n`` works, with a percentile-bootstrap interval over works (works, not
    windows, are the independent units: windows of one work share its text)."""

    value: float
    n: int
    low: float
    high: float


def mean_over_works(values: ArrayLike, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> MeanOverWorks:
    """Mean of ``values`` (one per work) and its bootstrap interval (resampling works with replacement, seeded). With
    one work the interval is that value; with few works it is narrow by construction: read it with its ``n``."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no works to average")
    if v.size == 1:
        return MeanOverWorks(float(v[0]), 1, float(v[0]), float(v[0]))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return MeanOverWorks(float(v.mean()), int(v.size), float(low), float(high))


# --------------------------------------------------------------------------------------------------- outputs


def near_verbatim_blocks(output: ArrayLike, work: ArrayLike, *, seed: int = 8, max_gap: int = 3,
                         min_block: int = 32) -> list[tuple[int, int]]:
    """Work spans ``(start, stop)`` (tokens) that ``output`` reproduces near-verbatim in long blocks: the block-based
    approximation of the longest common substring of Ahmed, Cooper, Koyejo & Liang 2026 ("Extracting books from
    production language models", arXiv 2601.02671), on token ids.

    Exact matches are found from shared ``seed``-token n-grams, each extended as far as it goes (at each output
    position the longest extension wins, then the scan jumps past it); consecutive matches are merged into one block
    when the output and the work both skip at most ``max_gap`` tokens between them (a changed, added or dropped
    word); a block counts only when it covers at least ``min_block`` work tokens, so short common phrases never do.
    """
    out = np.asarray(output, dtype=np.int64)
    ref = np.asarray(work, dtype=np.int64)
    if len(out) < seed or len(ref) < seed:
        return []
    index: dict[tuple[int, ...], list[int]] = {}
    for j in range(len(ref) - seed + 1):
        index.setdefault(tuple(ref[j : j + seed].tolist()), []).append(j)
    matches: list[tuple[int, int, int]] = []  # (output start, work start, length)
    i = 0
    while i <= len(out) - seed:
        best = (0, -1)
        for j in index.get(tuple(out[i : i + seed].tolist()), []):
            n = seed
            while i + n < len(out) and j + n < len(ref) and out[i + n] == ref[j + n]:
                n += 1
            best = max(best, (n, -j))
        if best[0]:
            matches.append((i, -best[1], best[0]))
            i += best[0]
        else:
            i += 1
    blocks: list[tuple[int, int]] = []
    cur: list[int] | None = None  # [output end, work start, work end]
    for i, j, n in matches:
        if cur is not None and 0 <= i - cur[0] <= max_gap and 0 <= j - cur[2] <= max_gap:
            cur[0], cur[2] = i + n, j + n
            continue
        if cur is not None:
            blocks.append((cur[1], cur[2]))
        cur = [i + n, j, j + n]
    if cur is not None:
        blocks.append((cur[1], cur[2]))
    return [(a, b) for a, b in blocks if b - a >= min_block]


def nv_recall(blocks: list[tuple[int, int]], n_tokens: int) -> float:
    """Share of a work's tokens inside at least one near-verbatim block (over all outputs)."""
    covered = np.zeros(n_tokens, dtype=bool)
    for a, b in blocks:
        covered[a:b] = True
    return float(covered.mean()) if n_tokens else 0.0
