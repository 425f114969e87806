"""Cutting works into excerpts of an exact token length, without tokenizing whole works.

An excerpt starts at a word boundary chosen uniformly over the work's characters, and ends after ``n_tokens``
tokens of the run's tokenizer (character offsets from a fast tokenizer, so ``prefix + secret`` is an exact
substring of the work). Only a window around the start is tokenized, so a 5 MB source costs the same as a small
one. Without a tokenizer, whitespace-separated words stand in for tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Excerpt:
    start: int
    prefix_end: int
    end: int
    n_tokens: int


def token_spans(text: str, tokenizer: Any = None) -> list[tuple[int, int]]:
    """Character spans of the tokens of ``text`` (whitespace words when ``tokenizer`` is None)."""
    if tokenizer is None:
        return [m.span() for m in _WORD.finditer(text)]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [(int(a), int(b)) for a, b in enc["offset_mapping"] if b > a]


def word_start_at_or_after(text: str, pos: int) -> int:
    """The first position >= ``pos`` that begins a word (``pos`` itself if it does)."""
    while pos < len(text) and (text[pos].isspace() or (pos > 0 and not text[pos - 1].isspace())):
        pos += 1
    return pos


def cut_excerpt(text: str, start: int, *, n_tokens: int, prefix_tokens: int, tokenizer: Any = None) -> Excerpt | None:
    """The excerpt of ``n_tokens`` tokens beginning at the word boundary at or after ``start``, or None near the end."""
    start = word_start_at_or_after(text, start)
    window = max(64, n_tokens * 8)
    while True:
        chunk = text[start : start + window]
        spans = token_spans(chunk, tokenizer)
        reaches_end = start + window >= len(text)
        # Need one token more than asked unless the chunk reaches the end: the last one may be cut by the window.
        if len(spans) > n_tokens or (reaches_end and len(spans) >= n_tokens):
            break
        if reaches_end:
            return None
        window *= 2
    prefix_end = start + spans[prefix_tokens - 1][1]
    end = start + spans[n_tokens - 1][1]
    return Excerpt(start=start, prefix_end=prefix_end, end=end, n_tokens=n_tokens)
