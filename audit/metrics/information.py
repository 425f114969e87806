"""The information view: training as compression.

A language model is a compressor: with arithmetic coding, a text costs ``sum_t -log2 p(x_t | x_<t)`` bits under the
model (Shannon 1948; Deletang et al. 2024, "Language modeling is compression", ICLR). Memorization then has a unit:

    bits_base  = sum_t -log2 p_base(x_t | x_<t)
    bits_tuned = sum_t -log2 p_tuned(x_t | x_<t)
    memorized bits = bits_base - bits_tuned          (what fine-tuning stored about this text)
    compression ratio = bits / (8 * len(utf8(text))) (1.0 = no better than raw UTF-8)

For a canary secret drawn uniformly from a space R, log2 |R| bits is its true information content: a tuned model
that codes it in far fewer bits has learned it; ``memorized_bits`` close to ``bits_base - 0`` means verbatim recall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

LN2 = math.log(2.0)


def bits(logprobs: ArrayLike) -> float:
    """Code length in bits of the scored tokens: ``-sum_t ln p_t / ln 2``."""
    return -float(np.sum(np.asarray(logprobs, dtype=np.float64))) / LN2


def utf8_bits(text: str) -> int:
    """Raw size of ``text`` in bits (8 per UTF-8 byte): the baseline a model's code length is compared with."""
    return 8 * len(text.encode("utf-8"))


def compression_ratio(model_bits: float, text: str) -> float:
    """Model bits over raw UTF-8 bits (lower = better compression; 0.1 = a tenth of the raw size)."""
    raw = utf8_bits(text)
    if raw == 0:
        raise ValueError("cannot compute the compression ratio of an empty text")
    return model_bits / raw


@dataclass(frozen=True)
class InformationView:
    bits_base: float
    bits_tuned: float
    memorized_bits: float
    raw_bits: int
    compression_base: float
    compression_tuned: float


def information_view(logprobs_base: ArrayLike, logprobs_tuned: ArrayLike, text: str) -> InformationView:
    """Bits of ``text`` under both models, the drop, and both compression ratios (same tokens scored in both)."""
    b, t = bits(logprobs_base), bits(logprobs_tuned)
    return InformationView(bits_base=b, bits_tuned=t, memorized_bits=b - t, raw_bits=utf8_bits(text),
                           compression_base=compression_ratio(b, text), compression_tuned=compression_ratio(t, text))
