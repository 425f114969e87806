"""Exact exposure rank over an enumerable secret space, by branch-and-bound over the candidate trie.

A secret is a sequence of symbols (a 6-digit PIN: 6 symbols from 0-9, |R| = 10^6). Its loss is a sum of
non-negative per-token terms, so the partial loss of a symbol prefix can only grow as symbols are appended. Walking
the trie of the space level by level from the canary's prefix, any branch whose partial loss already exceeds the
canary's full loss holds no secret that could rank ahead of it and is pruned. What is left at the last level is
exactly the set of secrets at least as likely as the canary, so

    rank = 1 + |{ r != canary : Px(r) <= Px(canary) }|        (the paper's convention, ties against the canary)

is exact, and the work grows with the canary's rank (and the near-misses along the way), not with |R|. Carlini et
al. 2019 (§4.2) use the same monotonicity for their shortest-path search. Here each level's frontier runs as batches
after the prefix's shared key/value cache; when every symbol is one token, a node costs one new position, because
its path's keys/values are kept from its parent (only for parents with surviving children) instead of recomputed.

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
from typing import Literal

import numpy as np
import torch

from audit.rng import SeededStream
from audit.schema import SecretSpace
from audit.score.engine import (
    LN2,
    continuation_logprobs,
    default_token_budget,
    device_of,
    output_cache,
    plan_batches,
    rows_cache,
    split_tokens,
    split_tokens_many,
    with_cache,
)

SLACK_NATS = {torch.float32: 1e-3, torch.float64: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.02}
"""Default pruning slack by the dtype of the logits: a few times the batch-to-batch rounding of a secret's loss
(fp32: ~1e-6 nats per token; bf16 logits are spaced 0.0625-0.125 nats at |logit| 8-32). Too small costs a second
walk, never a wrong rank."""
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


@dataclass
class _Frontier:
    """The kept nodes of one level: loss so far, whether on the canary's path, last token, and (cached walk) where
    each node's key/value suffix lives."""

    nll: np.ndarray
    on_canary: np.ndarray
    last: np.ndarray
    parent: np.ndarray
    suffix: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    paths: list[list[int]] | None = None


def _cached_level(model, prefix_kv, prefix_len: int, front: _Frontier, targets: torch.Tensor, rows_per_batch: int,
                  limit: float, keep_suffix: bool, canary_symbol: int):
    """One level of the single-token walk: each node costs one new position; its path's keys/values come from its
    parent's stored suffix after the shared prefix, never recomputed. Returns kept (node, symbol, loss) and the
    suffixes of the parents that have kept children."""
    device = device_of(model)
    n = len(front.nll)
    kept_i, kept_a, kept_nll, next_parent, parts = [], [], [], [], []
    stored = 0
    for start in range(0, n, rows_per_batch):
        idx = np.arange(start, min(n, start + rows_per_batch))
        b = len(idx)
        cache = rows_cache(prefix_kv, front.suffix, front.parent[idx].tolist(), device)
        past = cache.get_seq_length()
        ids = torch.as_tensor(front.last[idx], device=device).view(b, 1)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **with_cache(model, cache),
                    attention_mask=torch.ones((b, past + 1), dtype=torch.long, device=device))
        logits = out.logits[:, -1].float()
        cost = -(logits[:, targets] - torch.logsumexp(logits, dim=-1, keepdim=True)).double().cpu().numpy()
        total = front.nll[idx, None] + cost
        keep = total <= limit
        keep[front.on_canary[idx], canary_symbol] = True  # the canary's path is never pruned
        ki, ka = np.nonzero(keep)
        kept_i.append(idx[ki])
        kept_a.append(ka)
        kept_nll.append(total[ki, ka])
        if keep_suffix and len(ki):
            owners, slot = np.unique(ki, return_inverse=True)
            sel = torch.as_tensor(owners, device=device)
            parts.append([(layer.keys[:, :, prefix_len:].index_select(0, sel), layer.values[:, :, prefix_len:].index_select(0, sel))
                          for layer in output_cache(out).layers])
            next_parent.append(stored + slot)
            stored += len(owners)
    cat = (lambda xs, empty: np.concatenate(xs) if xs else empty)  # noqa: E731
    suffix = None
    if keep_suffix and parts:
        suffix = [(torch.cat([p[layer][0] for p in parts]), torch.cat([p[layer][1] for p in parts])) for layer in range(len(parts[0]))]
    return (cat(kept_i, np.zeros(0, dtype=int)), cat(kept_a, np.zeros(0, dtype=int)), cat(kept_nll, np.zeros(0)),
            cat(next_parent, np.zeros(0, dtype=int)), suffix)


def _logits_dtype(model) -> torch.dtype:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head.weight.dtype if head is not None else next(model.parameters()).dtype


@torch.inference_mode()
def exact_rank(model, table: SymbolTokens, canary: list[int], *, node_budget: int | None = 2_000, prune: bool = True,
               token_budget: int | None = None, slack_nats: float | None = None, keep_leaves: bool = False) -> ExactRank:
    """Rank of ``canary`` (alphabet indices) among all secrets of the space; see the module docstring.

    ``node_budget`` caps the trie nodes expanded (one forward row each, over all walks); ``prune=False`` enumerates
    the whole trie (the exhaustive reference used in tests and benchmarks). When every symbol is one token (digits),
    each node costs one new position on top of its parent's cached keys/values; otherwise each child's row is
    recomputed. ``slack_nats`` defaults by the dtype of the logits (:data:`SLACK_NATS`).
    """
    t0 = time.perf_counter()
    device = device_of(model)
    budget = token_budget or default_token_budget(model)
    slack = SLACK_NATS.get(_logits_dtype(model), 0.1) if slack_nats is None else slack_nats
    prefix = table.prefix_ids
    canary_tokens = table.tokens(canary)
    single = all(len(piece) == 1 for row in table.pieces for piece in row)
    if single:
        out = model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
        prefix_cache = output_cache(out)
        prefix_kv = [(layer.keys, layer.values) for layer in prefix_cache.layers]
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1).double().cpu().numpy()
        threshold = -float(first[canary_tokens[0]])
        if len(canary_tokens) > 1:
            threshold -= float(continuation_logprobs(model, prefix_cache, len(prefix), [canary_tokens]).sum())
        cache, cache_len, last = None, 0, prefix[-1]
    else:
        cache = None
        if len(prefix) > 1:
            cache = output_cache(model(input_ids=torch.tensor([prefix[:-1]], device=device), use_cache=True))
        cache_len, last = len(prefix) - 1, prefix[-1]
        threshold = -float(continuation_logprobs(model, cache, cache_len, [[last] + canary_tokens]).sum())

    nodes = tokens = 0
    n_sym = len(table.pieces[0])
    levels = len(table.pieces)

    def walk(limit: float) -> tuple[_Frontier | None, list[int]]:
        """One walk of the trie, pruning above ``limit`` except on the canary's path; None when out of budget."""
        nonlocal nodes, tokens
        front = _Frontier(nll=np.zeros(1), on_canary=np.array([True]), last=np.array([last]), parent=np.zeros(1, dtype=int),
                          paths=None if single else [[]])
        sizes: list[int] = []
        for level, pieces in enumerate(table.pieces):
            size = len(front.nll)
            if node_budget is not None and nodes + size > node_budget:
                return None, sizes
            ids = np.array([p[0] for p in pieces]) if single else None
            if single and level == 0:  # the root's children come from the prefix pass itself
                total = front.nll[:, None] - first[ids][None, :]
                keep = total <= limit
                keep[front.on_canary, canary[level]] = True
                keep_i, keep_a = np.nonzero(keep)
                kept = total[keep_i, keep_a]
                parent, suffix = np.zeros(len(keep_i), dtype=int), None
            elif single:
                keep_i, keep_a, kept, parent, suffix = _cached_level(
                    model, prefix_kv, len(prefix), front, torch.as_tensor(ids, device=device), max(1, budget // 4), limit,
                    keep_suffix=level < levels - 1, canary_symbol=canary[level])
                tokens += size
            else:  # multi-token pieces: one recomputed row per child
                child_cost = np.empty((size, n_sym))
                pairs = [(i, a) for i in range(size) for a in range(n_sym)]
                rows_all = [[last] + front.paths[i] + pieces[a] for i, a in pairs]
                for idx in plan_batches([len(r) for r in rows_all], budget):
                    rows = [rows_all[k] for k in idx]
                    lp = continuation_logprobs(model, cache, cache_len, rows).cpu().numpy()
                    for k, row_lp in zip(idx, lp, strict=True):
                        i, a = pairs[k]
                        child_cost[i, a] = -row_lp[len(front.paths[i]):].sum()
                    tokens += sum(len(r) for r in rows)
                total = front.nll[:, None] + child_cost
                keep = total <= limit
                keep[front.on_canary, canary[level]] = True
                keep_i, keep_a = np.nonzero(keep)
                kept, parent, suffix = total[keep_i, keep_a], keep_i, None
            nodes += size
            front = _Frontier(
                nll=kept, on_canary=front.on_canary[keep_i] & (keep_a == canary[level]),
                last=ids[keep_a] if single else np.zeros(len(keep_i), dtype=int), parent=parent, suffix=suffix,
                paths=None if single else [front.paths[i] + pieces[a] for i, a in zip(keep_i.tolist(), keep_a.tolist(), strict=True)],
            )
            sizes.append(len(front.nll))
        return front, sizes

    method = "walk" if prune else "enumeration"
    limit = threshold + slack if prune else math.inf
    for attempt in range(1, WALK_ATTEMPTS + 1):
        front, sizes = walk(limit)
        if front is None:
            return ExactRank("budget_exceeded", None, table.space_size, threshold / LN2, nodes, tokens, sizes,
                             time.perf_counter() - t0, walks=attempt, method=method)
        canary_value = float(front.nll[front.on_canary][0])
        if canary_value <= limit:  # every secret whose walk loss is <= the canary's survived every level
            rank = 1 + int(np.count_nonzero(front.nll[~front.on_canary] <= canary_value))
            return ExactRank("exact", rank, table.space_size, canary_value / LN2, nodes, tokens, sizes,
                             time.perf_counter() - t0, walks=attempt, method=method,
                             leaf_nll_bits=front.nll / LN2 if keep_leaves and not prune else None)
        limit = canary_value + slack  # the walk's own value of the canary: the threshold the next walk prunes at
    return ExactRank("unstable", None, table.space_size, canary_value / LN2, nodes, tokens, sizes,
                     time.perf_counter() - t0, walks=WALK_ATTEMPTS, method=method)


def enumerate_rank(model, table: SymbolTokens, canary: list[int], *, token_budget: int | None = None) -> ExactRank:
    """Rank of ``canary`` by scoring every node of the trie (:func:`trie_rows` rows), level by level, unpruned.

    The same rank convention, tie handling and batched arithmetic as the walk (``rank = 1 + |{r != canary : loss(r) <=
    loss(canary)}|``, the canary's loss from the same pass); with no limit there is nothing to rerun, so it takes one
    pass and its status is always ``exact``. Its cost is fixed by the space, not by the rank: the choice for a canary
    that cannot prune (:func:`choose_exact_method`).
    """
    return exact_rank(model, table, canary, node_budget=None, prune=False, token_budget=token_budget)


def space_nll_bits(model, table: SymbolTokens) -> np.ndarray:
    """Bits of every secret of the space given the prefix, ``-log2 p(r | prefix)``, indexed like the space (the
    secret whose alphabet indices are ``a_1 .. a_L`` sits at ``sum a_i * n^(L - i)``): one unpruned walk of the trie.

    What anyone holding the model, the spec and a prefix can compute; the disclosure tests use it to check every
    published number against every secret (``tests/test_disclosure_attacks.py``)."""
    leaves = exact_rank(model, table, [0] * len(table.pieces), node_budget=None, prune=False, keep_leaves=True).leaf_nll_bits
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
    walk_rows = (min(float(whole), alphabet_size * rank_estimate) if walk_rows is None else min(float(whole), walk_rows)) * walks_expected
    walk_s, enumeration_s = walk_rows * walk_row_s, whole * enumeration_row_s
    enumeration_fits = whole <= budget
    costs = (walk_rows, whole, walk_s, enumeration_s)
    if walk_fits and (not enumeration_fits or walk_s < enumeration_s):
        return ExactChoice("walk", *costs, reason="the walk fits the budget and is expected to cost less than the whole trie")
    if enumeration_fits:
        return ExactChoice("enumeration", *costs, reason="the whole trie fits the budget and costs no more than the expected walk")
    return ExactChoice("skip", *costs, reason=f"neither the expected walk ({walk_rows:.0f} rows) nor the whole trie "
                                              f"({whole} rows) fits the budget of {budget} rows")
