"""Exact exposure rank over an enumerable secret space, by branch-and-bound over the candidate trie.

A secret is a sequence of symbols (a 6-digit PIN: 6 symbols from 0-9, |R| = 10^6). Its loss is a sum of
non-negative per-token terms, so the partial loss of a symbol prefix can only grow as symbols are appended. Walking
the trie of the space level by level from the canary's prefix, any branch whose partial loss already exceeds the
canary's full loss holds no secret that could rank ahead of it and is pruned. What is left at the last level is
exactly the set of secrets at least as likely as the canary, so

    rank = 1 + |{ r != canary : Px(r) <= Px(canary) }|        (the paper's convention, ties against the canary)

is exact, and the work grows with the canary's rank (and the near-misses along the way), not with |R|. Carlini et
al. 2019 (§4.2) use the same monotonicity for their shortest-path search. Each level asks the scoring backend's
:class:`~audit.score.backend.PrefixWalk` for the kept paths' pieces; the HF engine runs a level's frontier as batches
after the prefix's shared key/value cache, and when every symbol is one token a node costs one new position, because
its path's keys/values are kept from its parent instead of recomputed (:mod:`audit.score.hf_backend`).

Requirements, checked before walking (:func:`symbol_tokens`):

* the tokenization is compositional: ``tok(prefix + render(r)) == prefix_ids + T_1(r_1) + ... + T_L(r_L)`` for a
  fixed token piece ``T_i(a)`` per position and symbol. Verified on the canary, every symbol at every position, and
  a seeded sample of random secrets; digit-splitting tokenizers (SmolLM2, Llama 3, the tiny test model) pass.
* a node budget: when the frontier would exceed it (an unlearned canary has rank ~|R|/2, so nothing prunes), the walk
  stops with ``status="budget_exceeded"`` and the caller falls back to the sampled rank with its binomial interval.

When nothing prunes (an unlearned canary: rank ~|R|/2; and where every digit still costs ~8 bits, even a canary at
rank 1: on tiny-llama the 16x canary's walk expanded 67,094 of the 111,111 rows and the 4x one's all of them,
``benchmarks/exposure.json``), the walk costs the whole trie. :func:`enumerate_rank` then
scores the whole trie level by level without pruning (one walk, never a rerun, never ``unstable``), and
:func:`choose_exact_method` picks walk, enumeration or neither from the expected cost of each within the node budget.
Scoring the 10^6 secrets as candidates after the shared prefix (:func:`audit.score.engine.candidate_nll_bits`) costs
5 positions per secret against 0.11 trie rows per secret, and measured 13-20x slower on tiny-llama (183 s
extrapolated against 8-12 s), so the enumeration walks the trie; its rows cost what the walk's do.

Numerics: the canary's loss is taken from the walk itself (the same batched arithmetic as every other leaf), and
pruning keeps a slack of ``slack_nats`` above the canary's teacher-forced loss, so batch-dependent rounding cannot
drop a secret that ties with it. The canary's own path is never pruned. In fp32 the walk and the teacher-forced
pass agree to <= 1.6e-5 nats (SmolLM2), far inside the 1e-3 slack. In bf16 they do not: decoding one token at a time
from a rebuilt cache differs from the one multi-token pass by up to +0.196 nats (SmolLM2, CPU bf16), so the limit
was too low and the walk lost the canary. When the canary's walk loss ends above the limit, some secrets between the
two may have been pruned, so the walk runs again with the limit taken from the walk's own value of the canary (plus
a slack sized for the dtype's rounding, :data:`SLACK_NATS`); only if that cannot be made consistent either does it
give up, with ``status="unstable"`` (the caller keeps the sampled rank), never an exception.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from audit.core.rng import SeededStream
from audit.core.schema import SecretSpace
from audit.score.backend import LN2
from audit.score.engine import split_tokens, split_tokens_many
from audit.score.hf_backend import as_backend

SLACK_NATS = {"fp32": 1e-3, "fp64": 1e-3, "bf16": 0.1, "fp16": 0.02}
"""Default pruning slack by the backend's precision (the dtype of the logits): a few times the batch-to-batch rounding
of a secret's loss (fp32: ~1e-6 nats per token; bf16 logits are spaced 0.0625-0.125 nats at |logit| 8-32). Too small
costs a second walk, never a wrong rank."""
WALK_ATTEMPTS = 3


class NotCompositionalError(ValueError):
    """The tokenizer does not split secrets of this space into fixed per-symbol pieces."""


@dataclass(frozen=True)
class SymbolTokens:
    """``tok(prefix + render(r)) == prefix_ids + pieces[0][r_0] + pieces[1][r_1] + ...`` for every secret r."""

    prefix_ids: list[int]
    pieces: list[list[list[int]]]
    """``pieces[i][a]``: the tokens of symbol ``a`` (an alphabet index) at position ``i``."""
    space_size: int
    checked_samples: int

    def tokens(self, symbols: list[int]) -> list[int]:
        return [t for i, a in enumerate(symbols) for t in self.pieces[i][a]]


def parse_secret(space: SecretSpace, secret: str) -> list[int]:
    """Alphabet indices of ``secret``'s symbols (the inverse of ``space.render``)."""
    index = {a: k for k, a in enumerate(space.alphabet)}
    if space.separator:
        parts = secret.split(space.separator)
    elif all(len(a) == 1 for a in space.alphabet):
        parts = list(secret)
    else:  # multi-character symbols without a separator: greedy longest match, checked below
        parts, rest = [], secret
        by_length = sorted(space.alphabet, key=len, reverse=True)
        while rest:
            sym = next((a for a in by_length if rest.startswith(a)), None)
            if sym is None:
                break
            parts.append(sym)
            rest = rest[len(sym):]
    if len(parts) != space.length or any(p not in index for p in parts) or space.render(parts) != secret:
        raise ValueError(f"the secret does not parse as {space.length} symbols of the space's alphabet")
    return [index[p] for p in parts]


def symbol_tokens(tokenizer, prefix: str, space: SecretSpace, secret: str, *, check_samples: int = 256,
                  seed: int = 0) -> SymbolTokens:
    """Per-position token pieces of every symbol, derived in the canary's context and verified (module docstring).

    Raises :class:`NotCompositionalError` when any check fails; the caller then uses the sampled rank.
    """
    canary = parse_secret(space, secret)
    head = split_tokens(tokenizer, prefix, secret).prefix_ids

    def secret_ids(symbols: list[str]) -> list[int]:
        s = split_tokens(tokenizer, prefix, space.render(symbols))
        if s.prefix_ids != head:
            raise NotCompositionalError("a secret's first token merges with the prefix differently from the canary's")
        return s.secret_ids

    pieces: list[list[list[int]]] = []
    done: list[int] = []
    for i in range(space.length):
        row = []
        for a in space.alphabet:
            ids = secret_ids([space.alphabet[c] for c in canary[:i]] + [a])
            if ids[: len(done)] != done or len(ids) == len(done):
                raise NotCompositionalError(f"symbol {a!r} at position {i} does not add its own tokens")
            row.append(ids[len(done):])
        pieces.append(row)
        done = done + row[canary[i]]
    table = SymbolTokens(prefix_ids=head, pieces=pieces, space_size=space.size, checked_samples=check_samples)
    rng = SeededStream(seed, "exposure:compositional-check")
    samples = [canary] + [[rng.below(len(space.alphabet)) for _ in range(space.length)] for _ in range(check_samples)]
    rendered = split_tokens_many(tokenizer, prefix, [space.render([space.alphabet[a] for a in sym]) for sym in samples])
    for sym, got in zip(samples, rendered, strict=True):
        if got.prefix_ids != head or got.secret_ids != table.tokens(sym):
            raise NotCompositionalError("a sampled secret tokenizes differently from its per-symbol pieces")
    return table


@dataclass(frozen=True)
class ExactRank:
    status: Literal["exact", "budget_exceeded", "unstable"]
    rank: int | None
    """1 + secrets at least as likely as the canary; None when the budget ran out."""
    space_size: int
    canary_nll_bits: float
    nodes_evaluated: int
    """Trie nodes whose children were scored (each is one row of a forward pass)."""
    tokens_evaluated: int
    frontier: list[int] = field(default_factory=list)
    """Nodes kept after pruning, per level."""
    wall_s: float = 0.0
    walks: int = 1
    """Walks run: 2 or more when the canary's walk loss ended above the first limit (reduced precision)."""
    method: Literal["walk", "enumeration"] = "walk"
    """``walk``: pruned at the canary's loss; ``enumeration``: the whole trie, unpruned (:func:`enumerate_rank`)."""
    leaf_nll_bits: np.ndarray | None = field(default=None, repr=False)
    """With ``keep_leaves`` on an enumeration: every secret's bits, in the space's order (:func:`space_nll_bits`)."""

    @property
    def exposure(self) -> float | None:
        return None if self.rank is None else math.log2(self.space_size) - math.log2(self.rank)


def exact_rank(scorer: Any, table: SymbolTokens, canary: list[int], *, node_budget: int | None = 2_000, prune: bool = True,
               token_budget: int | None = None, slack_nats: float | None = None, keep_leaves: bool = False) -> ExactRank:
    """Rank of ``canary`` (alphabet indices) among all secrets of the space; see the module docstring.

    ``scorer``: a :class:`~audit.score.backend.ScoringBackend` (a transformers model is scored by today's engine, with
    ``token_budget``). Each level asks the backend's :class:`~audit.score.backend.PrefixWalk` for the kept paths'
    pieces; the HF engine runs a one-token piece as one new position on its parent's cached keys/values.
    ``node_budget`` caps the trie nodes expanded (one forward row each, over all walks); ``prune=False`` enumerates
    the whole trie (the exhaustive reference used in tests and benchmarks). ``slack_nats`` defaults by the backend's
    precision (:data:`SLACK_NATS`).
    """
    t0 = time.perf_counter()
    backend = as_backend(scorer, token_budget=token_budget)
    slack = SLACK_NATS.get(backend.precision, 0.1) if slack_nats is None else slack_nats
    walker = backend.prefix_walk(table.prefix_ids)
    threshold = walker.path_nll(table.tokens(canary))
    nodes = tokens = 0
    levels = len(table.pieces)

    def walk(limit: float) -> tuple[tuple[np.ndarray, np.ndarray] | None, list[int]]:
        """One walk of the trie, pruning above ``limit`` except on the canary's path: the last level's (loss, on the
        canary's path), or None when out of budget."""
        nonlocal nodes, tokens
        nll, on_canary, paths = np.zeros(1), np.array([True]), [[]]
        sizes: list[int] = []
        for level, pieces in enumerate(table.pieces):
            size = len(nll)
            if node_budget is not None and nodes + size > node_budget:
                return None, sizes
            total = nll[:, None] - walker.extension_logprobs(paths, pieces, extended_later=level < levels - 1)
            keep = total <= limit
            keep[on_canary, canary[level]] = True  # the canary's path is never pruned
            keep_i, keep_a = np.nonzero(keep)
            nodes += size
            tokens += positions_run(paths, pieces, level)
            nll, on_canary = total[keep_i, keep_a], on_canary[keep_i] & (keep_a == canary[level])
            paths = [paths[i] + pieces[a] for i, a in zip(keep_i.tolist(), keep_a.tolist(), strict=True)]
            sizes.append(len(nll))
        return (nll, on_canary), sizes

    method = "walk" if prune else "enumeration"
    limit = threshold + slack if prune else math.inf
    for attempt in range(1, WALK_ATTEMPTS + 1):
        front, sizes = walk(limit)
        if front is None:
            return ExactRank("budget_exceeded", None, table.space_size, threshold / LN2, nodes, tokens, sizes,
                             time.perf_counter() - t0, walks=attempt, method=method)
        nll, on_canary = front
        canary_value = float(nll[on_canary][0])
        if canary_value <= limit:  # every secret whose walk loss is <= the canary's survived every level
            rank = 1 + int(np.count_nonzero(nll[~on_canary] <= canary_value))
            return ExactRank("exact", rank, table.space_size, canary_value / LN2, nodes, tokens, sizes,
                             time.perf_counter() - t0, walks=attempt, method=method,
                             leaf_nll_bits=nll / LN2 if keep_leaves and not prune else None)
        limit = canary_value + slack  # the walk's own value of the canary: the threshold the next walk prunes at
    return ExactRank("unstable", None, table.space_size, canary_value / LN2, nodes, tokens, sizes,
                     time.perf_counter() - t0, walks=WALK_ATTEMPTS, method=method)


def positions_run(paths: list[list[int]], pieces: list[list[int]], level: int) -> int:
    """Forward positions a caching engine spends on one level: one per path when every piece is one token (none at the
    root: the prefix pass answers it), else a recomputed row ``prefix[-1] + path + piece`` per path and piece."""
    if all(len(p) == 1 for p in pieces):
        return 0 if level == 0 else len(paths)
    return sum(1 + len(path) + len(piece) for path in paths for piece in pieces)


def enumerate_rank(scorer: Any, table: SymbolTokens, canary: list[int], *, token_budget: int | None = None) -> ExactRank:
    """Rank of ``canary`` by scoring every node of the trie (:func:`trie_rows` rows), level by level, unpruned.

    The same rank convention, tie handling and batched arithmetic as the walk (``rank = 1 + |{r != canary : loss(r) <=
    loss(canary)}|``, the canary's loss from the same pass); with no limit there is nothing to rerun, so it takes one
    pass and its status is always ``exact``. Its cost is fixed by the space, not by the rank: the choice for a canary
    that cannot prune (:func:`choose_exact_method`).
    """
    return exact_rank(scorer, table, canary, node_budget=None, prune=False, token_budget=token_budget)


def space_nll_bits(scorer: Any, table: SymbolTokens) -> np.ndarray:
    """Bits of every secret of the space given the prefix, ``-log2 p(r | prefix)``, indexed like the space (the
    secret whose alphabet indices are ``a_1 .. a_L`` sits at ``sum a_i * n^(L - i)``): one unpruned walk of the trie.

    What anyone holding the model, the spec and a prefix can compute; the disclosure tests use it to check every
    published number against every secret (``tests/test_disclosure_attacks.py``)."""
    leaves = exact_rank(scorer, table, [0] * len(table.pieces), node_budget=None, prune=False, keep_leaves=True).leaf_nll_bits
    assert leaves is not None and leaves.size == table.space_size
    return leaves


def trie_rows(alphabet_size: int, length: int) -> int:
    """Forward rows of the whole trie: one per node with children, ``sum_{l < length} |A|^l`` (111,111 for 6 digits)."""
    return sum(alphabet_size**level for level in range(length))


@dataclass(frozen=True)
class ExactChoice:
    method: Literal["walk", "enumeration", "skip"]
    walk_rows: float
    """Expected rows of the walk: ``min(trie, |A| x rank estimate)``, times the walks expected."""
    enumeration_rows: int
    walk_s: float
    enumeration_s: float
    """Expected seconds: rows times the cost of one row of each (equal unless measured apart)."""
    reason: str


def expected_walk_rows(canary_nll_bits: float, reference_nll_bits, alphabet_size: int, length: int) -> float:
    """Rows the walk is expected to expand, from the losses the sampled rank already computed.

    Level ``l`` keeps the ``l``-symbol prefixes whose partial loss is at most the canary's loss; with each random
    secret's per-symbol costs taken as independent with the mean and variance of the references' totals over
    ``length``, the kept share is ``Phi((c - l m) / (sqrt(l) s))``, and a row is spent on each kept node of levels
    ``0 .. length - 1``. Unlike ``|A| x rank`` it sees that a canary at rank 1 whose loss is still high prunes nothing
    before the last level (tiny-llama, ``benchmarks/exposure.json``).
    """
    refs = np.asarray(reference_nll_bits, dtype=float)
    m, s = float(refs.mean()) / length, max(float(refs.std()), 1e-9) / math.sqrt(length)
    rows = 1.0
    for level in range(1, length):  # the canary's own path is never pruned: at least one row per level
        z = (canary_nll_bits - level * m) / (math.sqrt(level) * s)
        rows += max(1.0, alphabet_size**level * 0.5 * math.erfc(-z / math.sqrt(2)))
    return min(rows, float(trie_rows(alphabet_size, length)))


def choose_exact_method(*, rank_estimate: float, alphabet_size: int, length: int, budget: int, walk_row_s: float = 1.0,
                        enumeration_row_s: float = 1.0, walks_expected: float = 1.0,
                        walk_rows: float | None = None) -> ExactChoice:
    """Walk, enumerate, or skip (the sampled rank stands), by expected cost within ``budget`` rows.

    The walk's rows grow with the canary's rank: about ``|A|`` per secret at least as likely (the frontier of the
    last levels), never more than the trie; it may run it more than once in reduced precision (``walks_expected``).
    The walk fits when ``|A| x rank_estimate <= budget``, the rule the harness used before there was a choice (so with
    the default budget of 2,000 rows, under the 111,111 of a 6-digit trie, every decision is as before). The
    enumeration's rows are fixed (:func:`trie_rows`) and fit when they are within the budget. Of those that fit, the
    cheaper in expected seconds runs; on a tie (the walk expected to expand the whole trie) the enumeration, which
    runs once where the walk may rerun. Neither fitting means skip. A pure function of the numbers.

    ``walk_rows``: the walk's expected rows from the losses (:func:`expected_walk_rows`) instead of the rank; the
    walk then fits when they are within the budget.
    """
    whole = trie_rows(alphabet_size, length)
    walk_fits = not rank_estimate > budget / alphabet_size if walk_rows is None else walk_rows * walks_expected <= budget
    walk_rows = (min(float(whole), alphabet_size * rank_estimate) if walk_rows is None
                 else min(float(whole), walk_rows)) * walks_expected
    walk_s, enumeration_s = walk_rows * walk_row_s, whole * enumeration_row_s
    enumeration_fits = whole <= budget
    costs = (walk_rows, whole, walk_s, enumeration_s)
    if walk_fits and (not enumeration_fits or walk_s < enumeration_s):
        return ExactChoice("walk", *costs, reason="the walk fits the budget and is expected to cost less than the whole trie")
    if enumeration_fits:
        return ExactChoice("enumeration", *costs,
                           reason="the whole trie fits the budget and costs no more than the expected walk")
    return ExactChoice("skip", *costs, reason=f"neither the expected walk ({walk_rows:.0f} rows) nor the whole trie "
                                              f"({whole} rows) fits the budget of {budget} rows")
